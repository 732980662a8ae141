"""vit: the Vision Transformer and the math of training it. Plain PyTorch/DeepSpeed; never imports Ray."""
