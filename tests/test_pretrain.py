"""Pretraining on a simulated two-node Ray cluster, launched the way users launch it: `vitpipe pretrain`.

Real Ray Train workers run real DeepSpeed ZeRO on CPUs (gloo); the runs share the session's two-node
cluster (`two_nodes`), and the ZeRO-2 run (`zero2_run`) is conftest's, whose export the transfer tests use.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
import transformers
import yaml
from ray._private import ray_constants

from pipeline.metrics import probe_records, read_records
from pipeline.pretrain.export import choose_checkpoint, export_checkpoint
from tests.conftest import REPO, TINY_RUN, VITPIPE, run_vitpipe
from tests.test_vit_hf import assert_same_logits, images_for
from vit.config import ViTConfig
from vit.engine import build_engine, load_checkpoint, to_universal
from vit.fragments import assemble, load_fragments
from vit.model import VisionTransformer
from vit.patches import patchify
from vit.recipe import BatchSplit, Optimizer, Recipe, Schedule, Zero
from vit.weights import load_pretrained

pytestmark = pytest.mark.slow


def write_config(path: Path, data: str, **changes) -> Path:
    config = {**TINY_RUN, "data": data, **changes}
    path.write_text(yaml.safe_dump(config))
    return path


def steps(records: list[dict]) -> list[dict]:
    return [r for r in records if "step" in r and "loss" in r]


def events(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r.get("event") == name]


def assert_learned(records: list[dict]) -> None:
    logged = steps(records)
    first, last = logged[0], logged[-1]
    assert first["step"] == 1
    assert last["loss"] < first["loss"] / 2, (first["loss"], last["loss"])
    assert last["accuracy"] > 0.3  # ten classes: chance is 0.1


def test_zero2_pretrains_across_two_nodes(zero2_run):
    records = read_records(str(zero2_run))
    started = events(records, "started")[0]
    assert started["workers"] == 2
    assert started["nodes"] == 2
    assert_learned(records)
    last = steps(records)[-1]
    for key in ("lr", "grad_norm", "images_per_s", "tokens_per_s", "mfu", "step_s", "data_wait_s"):
        assert last[key] is not None, key
        assert last[key] >= 0, key
    assert last["tokens_per_s"] == pytest.approx(last["images_per_s"] * 17)  # 16 patches + class token
    assert last["skipped_steps"] == 0  # fp32: DeepSpeed dropped no step
    assert last["lr"] < 3.0e-3 * 0.01  # cosine decayed to ~0 at the last step
    # keep_checkpoints defaults to 3: of 20, 40, 60, 80 the oldest is gone
    assert sorted(p.name for p in zero2_run.glob("checkpoint_0*")) == [
        "checkpoint_00000040",
        "checkpoint_00000060",
        "checkpoint_00000080",
    ]
    assert (zero2_run / "loss.png").stat().st_size > 10_000
    assert list((zero2_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (zero2_run / "export" / "vitpipe" / "model.safetensors").is_file()
    assert (zero2_run / "export" / "hf" / "config.json").is_file()


def test_sigint_checkpoints_the_step_and_a_relaunch_on_other_settings_continues_exactly_there(
    two_nodes, fractal_patches, digits_patches, tmp_path
):
    """Ctrl-C: the workers finish their step, checkpoint it, and the driver exits 130 naming the step and
    the command. The relaunch changes only operational settings (workers 2 -> 1, micro-batch, cadences,
    CPUs, the budget) and resumes at exactly that step with the weights it had reached, its EMA (each
    rank's part, resharded onto one) and its history of probes."""
    watched = {
        "ema": {"decay": 0.9},
        "eval": {"every": 10, "targets": [digits_patches], "cpus": 0.25, "shots": [1, 5], "seeds": 1},
    }
    config = write_config(
        tmp_path / "stopped.yaml", fractal_patches, steps=2000, checkpoint_every=1000, **watched
    )
    run_dir = tmp_path / "stopped"
    command = ["pretrain", str(config), "--storage", str(tmp_path), "--address", two_nodes.address]
    with _launch(command) as run:
        reached = _wait_for_step(run_dir, step=30, run=run)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=120)
    assert reached, stderr[-3000:]
    assert run.returncode == 130, stderr[-3000:]
    records = read_records(str(run_dir))
    stopped = events(records, "stopped")[0]["step"]
    assert f"pretraining stopped at step {stopped}" in stderr
    assert f"continue with: vitpipe pretrain {config} --storage {tmp_path}" in stderr
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [f"checkpoint_{stopped:08d}"]
    assert not (run_dir / "export").exists()  # nothing exported from an unfinished run

    write_config(
        config,
        fractal_patches,
        num_workers=1,
        micro_batch_size=8,
        cpus_per_worker=0.5,
        checkpoint_every=500,
        log_every=1,
        steps=stopped + 4,
        **watched,
    )
    result = run_vitpipe(*command, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_the_ema_and_the_probes_went_on(run_dir, stopped, result.stderr)
    records = read_records(str(run_dir))
    resumed = events(records, "resumed")[-1]
    assert (resumed["step"], resumed["workers"], resumed["from_workers"]) == (stopped, 1, 2)
    before, after = steps(records[: records.index(resumed)]), steps(records[records.index(resumed) :])
    assert [r["step"] for r in after] == [stopped + 1, stopped + 2, stopped + 3, stopped + 4]  # none redone
    # The weights came back with the step: a re-initialised model would start again at ln 10.
    fresh, reached_loss = before[0]["loss"], before[-1]["loss"]
    assert abs(after[0]["loss"] - reached_loss) < abs(after[0]["loss"] - fresh) / 2, (
        fresh,
        before[-1],
        after[0],
    )
    assert json.loads((run_dir / "export" / "export.json").read_text())["step"] == stopped + 4


def assert_the_ema_and_the_probes_went_on(run_dir: Path, stopped: int, console: str) -> None:
    """Two ranks saved their EMA parts at the stop; the one rank of the relaunch loaded both (no restart
    from the raw weights) and saved its whole part; the probes of the first launch stay in the history and
    the relaunch probed its last step; the EMA export is the checkpoint's EMA, assembled."""
    ema_files = sorted(p.name for p in (run_dir / f"checkpoint_{stopped:08d}" / "ema").iterdir())
    assert ema_files == ["rank-00000.safetensors", "rank-00001.safetensors"]
    last = run_dir / f"checkpoint_{stopped + 4:08d}"
    assert sorted(p.name for p in (last / "ema").iterdir()) == ["rank-00000.safetensors"]
    assert "EMA weights (decay" not in console  # loaded, not started again from the resumed weights
    probes = probe_records(read_records(str(run_dir)))
    for kind in ("raw", "ema"):
        probed = [r["step"] for r in probes if r["probe"] == kind]
        assert probed[0] <= stopped < probed[-1] == stopped + 4, probed
    out = run_dir.parent / "ema-export"
    assert run_vitpipe("export", str(run_dir), "--weights", "ema", "--out", str(out)).returncode == 0
    shapes = {name: tuple(t.shape) for name, t in load_pretrained(out / "vitpipe").named_parameters()}
    expected = assemble(load_fragments(sorted((last / "ema").glob("*.safetensors"))), shapes)
    exported = dict(load_pretrained(out / "vitpipe").named_parameters())
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name].detach(), tensor, rtol=0, atol=0)
    assert "EMA (decay 0.9) of the last step" in (out / "vitpipe" / "README.md").read_text()
    assert (out / "raw" / "vitpipe" / "model.safetensors").is_file()  # the raw weights beside them


def test_a_driver_started_with_sigint_ignored_takes_sigint_once_it_honours_interrupts():
    """`vitpipe run JOB &` from a script starts vitpipe with SIGINT ignored (the shell's rule for background
    jobs): honour_interrupts gives it Python's KeyboardInterrupt back, which a plain process lacks."""
    body = "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.5); print('trained on')"
    imports = "import os, signal, time; from pipeline.pretrain.control import honour_interrupts; "
    for call, interrupted in (("", False), ("honour_interrupts(); ", True)):
        result = subprocess.run(
            [sys.executable, "-c", imports + call + body],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        assert ("KeyboardInterrupt" in result.stderr) == interrupted, result.stderr
        assert ("trained on" in result.stdout) != interrupted


def test_a_run_directory_of_another_model_is_refused(zero2_run, fractal_patches):
    model = {**TINY_RUN["model"], "width": 96}
    config = write_config(zero2_run.parent / "wider.yaml", fractal_patches, model=model)
    result = run_vitpipe("pretrain", str(config), "--name", "zero2", "--storage", str(zero2_run.parent))
    assert result.returncode != 0
    assert f"{zero2_run}: holds a run trained with other settings that define it (model width 64 -> 96" in (
        result.stderr
    )
    assert "Ray " not in result.stderr  # refused before Ray started


def test_workers_the_cluster_cannot_place_are_refused(two_nodes, fractal_patches, tmp_path):
    config = write_config(tmp_path / "big.yaml", fractal_patches, num_workers=5, global_batch_size=80)
    result = run_vitpipe("pretrain", str(config), "--storage", str(tmp_path), "--address", two_nodes.address)
    assert result.returncode != 0
    assert "5 worker(s) cannot be placed (5 CPU needed, the cluster has 4)" in result.stderr
    assert not list(tmp_path.rglob("checkpoint_*"))


def test_exported_weights_give_the_deepspeed_engines_logits(zero2_run, tmp_path, one_rank_group):
    """The newest checkpoint, exported by `vitpipe export`, against the same checkpoint loaded into a
    one-rank DeepSpeed engine (gloo, this process): vit and HF transformers give the engine's logits."""
    info = choose_checkpoint(str(zero2_run), "80")  # the two-rank run's last, whatever ran before this test
    assert info.meta["world_size"] == 2
    result = run_vitpipe(
        "export", str(zero2_run), "--checkpoint", str(info.step), "--out", str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported step {info.step}" in result.stdout

    config = ViTConfig.from_dict(info.meta["vit"])
    images, pixels = images_for(config, batch=6)
    patches = patchify(images, config.patch_size)
    engine_logits = _deepspeed_engine_logits(info, patches, tmp_path)
    with torch.no_grad():
        ours = load_pretrained(tmp_path / "out" / "vitpipe").eval()(patches)
        hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out" / "hf").eval()
        theirs = hf(pixel_values=pixels).logits
    assert_same_logits(ours, engine_logits)
    assert_same_logits(theirs, engine_logits)


def _deepspeed_engine_logits(info, patches: torch.Tensor, scratch: Path) -> torch.Tensor:
    """Logits of a DeepSpeed ZeRO engine restored from checkpoint `info` on one rank."""
    folder = to_universal(Path(info.path), info.tag, scratch / "universal")  # two ranks' shards for one
    model = VisionTransformer(ViTConfig.from_dict(info.meta["vit"]))
    recipe = Recipe(Optimizer(), Schedule(), total_steps=info.step, batch=BatchSplit(16, 16))
    engine = build_engine(model, recipe, Zero(info.meta["zero_stage"]), world_size=1, load_universal=True)
    load_checkpoint(engine, folder, info.tag)
    engine.eval()
    with torch.no_grad():
        return engine(patches).float()


def test_zero3_run_survives_a_killed_worker(two_nodes, fractal_patches, tmp_path):
    config = write_config(tmp_path / "zero3.yaml", fractal_patches, zero_stage=3, steps=60, max_failures=2)
    run_dir = tmp_path / "zero3"
    command = ["pretrain", str(config), "--storage", str(tmp_path), "--address", two_nodes.address]
    launched = time.time()
    with _launch(command) as run:
        killed = _kill_a_worker_after(
            run_dir, step=30, run=run, victims=lambda: _workers_of(two_nodes, launched)
        )
        _, stderr = run.communicate(timeout=400)
    assert killed, "no Ray Train worker process of this run was found to kill"
    assert run.returncode == 0, stderr[-3000:]
    records = read_records(str(run_dir))
    resumed = events(records, "resumed")
    assert len(resumed) == 1
    assert resumed[0]["workers"] == 2
    restart = resumed[0]["step"]
    assert restart >= 20
    assert restart % 20 == 0  # from the newest checkpoint, not from the start
    # The weights came back with the step: just after the restart the loss is nearer the loss it had
    # reached at the checkpoint than the loss a re-initialised model starts from (ln 10).
    before = [r for r in steps(records[: records.index(resumed[0])]) if r["step"] <= restart][-1]
    after = next(r for r in steps(records[records.index(resumed[0]) :]))
    fresh = steps(records)[0]["loss"]
    assert abs(after["loss"] - before["loss"]) < abs(after["loss"] - fresh) / 2, (fresh, before, after)
    logged = [r["step"] for r in steps(records)]
    redone = [s for s in set(logged) if logged.count(s) > 1]
    assert all(restart < s <= restart + 20 for s in redone), (restart, sorted(redone))
    assert events(records, "finished")[-1]["step"] == 60
    assert logged[-1] == 60
    assert_learned(records)


def _workers_of(cluster, since: float) -> list[psutil.Process]:
    """The Ray Train worker processes of a run launched at `since` on `cluster`: started by one of its
    raylets (RAY_RAYLET_PID, which Ray sets in every worker) after the launch. Ray starts a job's workers
    for that job alone, so an idle worker left by an earlier run, or one of another Ray, is never picked."""
    raylets = {
        str(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
        for node in cluster.list_all_nodes()
    }
    found = []
    for process in psutil.process_iter(["cmdline", "create_time"]):
        if not (process.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker"):
            continue
        try:
            if process.info["create_time"] >= since and process.environ().get("RAY_RAYLET_PID") in raylets:
                found.append(process)
        except psutil.Error:  # gone since it was listed
            continue
    return found


def _kill_a_worker_after(
    run_dir: Path, step: int, run: subprocess.Popen, victims: Callable[[], list[psutil.Process]]
) -> bool:
    """SIGKILL one of the run's Ray Train worker processes (`victims`) once the run has logged `step` and
    Ray Train has registered a checkpoint (its snapshot lists one): a worker killed between the ranks'
    reports and the registration restarts, rightly, from the checkpoint before, which made this test fail
    now and then."""
    deadline = time.monotonic() + 300
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while (
        time.monotonic() < deadline
        and run.poll() is None
        and "checkpoint_" not in (snapshot.read_text() if snapshot.is_file() else "")
    ):
        time.sleep(0.2)
    while _wait_for_step(run_dir, step, run) and time.monotonic() < deadline:
        workers = victims()
        if workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            return True
        time.sleep(0.2)
    return False


def test_export_writes_only_its_own_files_and_an_older_checkpoint_beside_the_run_s_export(
    zero2_run, tmp_path
):
    theirs = tmp_path / "out" / "hf" / "other-model" / "config.json"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("{}")
    result = run_vitpipe("export", str(zero2_run), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert (
        "already holds files a vitpipe export did not write there (hf/other-model/config.json)"
        in result.stderr
    )
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == [
        Path("out/hf"),
        Path("out/hf/other-model"),
        Path("out/hf/other-model/config.json"),
    ]

    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "notes.txt").write_text("mine")
    for _ in range(2):  # the second export replaces the first's files, which it proves it wrote
        assert export_checkpoint(str(zero2_run), out=str(beside)).step == 80
    assert (beside / "notes.txt").read_text() == "mine"
    assert (beside / "vitpipe" / "model.safetensors").is_file()

    run_export = json.loads((zero2_run / "export" / "export.json").read_text())
    older = export_checkpoint(str(zero2_run), checkpoint="60")
    assert older.vitpipe == str(zero2_run / "export-00000060" / "vitpipe")
    assert json.loads((zero2_run / "export" / "export.json").read_text()) == run_export  # the run's own stays


def _wait_for_step(run_dir: Path, step: int, run: subprocess.Popen) -> bool:
    """Whether the run logged `step` within 300 s, while still running."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        if any(r.get("step", 0) >= step and "loss" in r for r in read_records(str(run_dir))):
            return True
        time.sleep(0.2)
    return False


def _launch(args: list[str]) -> subprocess.Popen:
    """`vitpipe ARGS` running in the background, its output captured."""
    return subprocess.Popen(
        [*VITPIPE, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
