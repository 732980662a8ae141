"""vit: the Vision Transformer, the BiT ResNet it is compared with, and the math of training them.
Plain PyTorch/DeepSpeed; never imports Ray or `pipeline`. Import the modules themselves
(`from vit.model import VisionTransformer`): the package imports nothing, so that the config schema's
`vit.config` and `vit.patches` stay free of torch."""
