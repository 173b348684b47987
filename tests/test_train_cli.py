"""`bmssl train` and `bmssl eval` (bmssl/training.py, bmssl/evaluation_cli.py, bmssl/run_files.py):
run files, exact resume, clear errors, the few-shot table, and torchrun with 2 gloo processes
equal to one process. Runs use a tiny synthetic class-folder set (4 alphabets x 4 characters x 8
images, 16x16 grayscale) and a conv net of width 4: each run takes about a second."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bmssl import cli, run_files
from bmssl.data.omniglot import DEFAULT_DIR, ENV_VAR
from bmssl.training import Run, TrainConfig, World, resolve_data

# A run small enough for the shared CI cores; float64 so that the torchrun comparison is tight.
TINY = ["--channels", "1", "--image-size", "16", "-N", "6", "-K", "2", "--M2", "2", "-L", "1", "--delta", "1",
        "--hidden", "4", "--depth", "2", "--projection-dim", "4", "--warmup", "2", "--threads", "1",
        "--dtype", "float64", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """folder:<root> spec of root/alphabetG/charC/I.png: each character a random 8x8 pattern, its
    instances that pattern plus noise, upscaled to 16x16."""
    root = tmp_path_factory.mktemp("glyph_folder")
    rng = np.random.default_rng(0)
    for group in range(4):
        for character in range(4):
            pattern = (rng.random((8, 8)) > 0.6).astype(np.float64)
            target = root / f"alphabet{group}" / f"char{character}"
            target.mkdir(parents=True)
            for index in range(8):
                pixels = np.clip(pattern + 0.35 * rng.standard_normal((8, 8)), 0, 1)
                image = Image.fromarray((pixels * 255).astype(np.uint8), "L").resize((16, 16), Image.NEAREST)
                image.save(target / f"{index}.png")
    return f"folder:{root}"


def bmssl(*args, capsys=None):
    """Run the CLI in this process; returns (exit status, stdout, stderr)."""
    if capsys is not None:
        capsys.readouterr()
    try:
        status = cli.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse errors
        status = exit_.code
    out = capsys.readouterr() if capsys is not None else None
    return status, out.out if out else "", out.err if out else ""


def results(run_dir) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def losses(run_dir) -> list:
    return [row["outer_loss"] for row in results(run_dir)["history"]]


def theta(run_dir) -> dict:
    return run_files.load_checkpoint(run_dir)["learner"]["model"]


def test_short_run_writes_checkpoint_results_curves_and_the_table(folder, tmp_path, capsys):
    run = tmp_path / "run"
    status, out, err = bmssl("train", "--data", folder, *TINY, "--steps", 4, "--checkpoint-every", 2, "--out", run,
                             "--eval", "--eval-settings", "2w1s", "3w2s", "--episodes", 10, "--queries", 3,
                             capsys=capsys)
    assert status == 0, err
    saved = run_files.load_checkpoint(run)
    assert saved["step"] == 4 and saved["learner"]["steps_done"] == 4
    assert saved["config"]["images_per_batch"] == 6 and saved["config"]["schedule_steps"] == 4
    assert saved["generator"].dtype == torch.uint8
    payload = results(run)
    assert payload["status"] == "finished" and payload["step"] == 4
    assert [row["step"] for row in payload["history"]] == [1, 2, 3, 4]
    assert all(np.isfinite(row["outer_loss"]) for row in payload["history"])
    assert payload["config"]["method"] == "bmssl" and payload["data"]["test_groups"]
    assert {(r["setting"], r["protocol"]) for r in payload["eval"]} == {
        (s, p) for s in ("2w1s", "3w2s") for p in ("proto", "finetune")}
    assert all(0 <= r["mean"] <= 1 and r["ci95"] >= 0 and r["episodes"] == 10 for r in payload["eval"])
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".*.tmp")), "a temporary file was left behind"
    assert "setting" in out and "2w1s" in out and "3w2s" in out and "±" in out
    assert "finished at step 4" in err


def test_resume_continues_exactly(folder, tmp_path, capsys):
    """Interrupted (--stop-after, twice) then resumed equals the uninterrupted run: the same
    losses and the same θ, bit for bit on CPU."""
    common = ["--data", folder, *TINY, "--checkpoint-every", 3]
    assert bmssl("train", *common, "--steps", 8, "--out", tmp_path / "whole", capsys=capsys)[0] == 0
    assert bmssl("train", *common, "--steps", 8, "--stop-after", 3, "--out", tmp_path / "parts", capsys=capsys)[0] == 0
    assert results(tmp_path / "parts")["status"] == "stopped" and len(losses(tmp_path / "parts")) == 3
    assert bmssl("train", "--resume", tmp_path / "parts", "--stop-after", 2, capsys=capsys)[0] == 0
    assert len(losses(tmp_path / "parts")) == 5
    status, _, err = bmssl("train", "--resume", tmp_path / "parts", capsys=capsys)  # the rest: 3 steps
    assert status == 0, err
    assert "resumed" in err and results(tmp_path / "parts")["status"] == "finished"
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    whole, parts = theta(tmp_path / "whole"), theta(tmp_path / "parts")
    assert all(torch.equal(whole[name], parts[name]) for name in whole)

    # --steps 4, then --resume --steps 8 (a constant schedule does not depend on the length).
    constant = [*common, "--schedule", "constant"]
    assert bmssl("train", *constant, "--steps", 8, "--out", tmp_path / "c8", capsys=capsys)[0] == 0
    assert bmssl("train", *constant, "--steps", 4, "--out", tmp_path / "c4", capsys=capsys)[0] == 0
    assert bmssl("train", "--resume", tmp_path / "c4" / "checkpoint.pt", "--steps", 8, capsys=capsys)[0] == 0
    assert losses(tmp_path / "c4") == losses(tmp_path / "c8")


def test_resume_refuses_other_hyperparameters_and_a_new_run_refuses_an_old_directory(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert bmssl("train", "--data", folder, *TINY, "--steps", 2, "--out", run, capsys=capsys)[0] == 0
    status, _, err = bmssl("train", "--resume", run, "--inner-lr", 0.5, capsys=capsys)
    assert status == 2 and "--inner-lr 0.5 differs" in err and "Traceback" not in err
    status, _, err = bmssl("train", "--data", folder, *TINY, "--out", run, capsys=capsys)
    assert status == 2 and "already holds a run" in err and f"--resume {run}" in err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_bmssl", "empty"])
def test_a_damaged_checkpoint_gives_a_clear_error(folder, tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert bmssl("train", "--data", folder, *TINY, "--steps", 1, "--out", run, capsys=capsys)[0] == 0
    path = run / "checkpoint.pt"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    for command in (("train", "--resume", run), ("eval", "--checkpoint", run)):
        status, _, err = bmssl(*command, capsys=capsys)
        assert status == 2, err
        assert str(path) in err and "Traceback" not in err and "weights_only" not in err
        assert ("corrupt or truncated" if damage != "not_bmssl" else "not a bmssl training checkpoint") in err
        assert ("Resume from an intact checkpoint" in err) == (command[0] == "train" and damage != "not_bmssl")
    status, _, err = bmssl("train", "--resume", tmp_path / "nowhere", capsys=capsys)
    assert status == 2 and "checkpoint not found" in err


def test_a_missing_data_path_names_the_path_and_the_fix(tmp_path, capsys, monkeypatch):
    for spec in (f"folder:{tmp_path / 'absent'}", str(tmp_path / "omniglot.zip")):
        status, _, err = bmssl("train", "--data", spec, "--out", tmp_path / "run", capsys=capsys)
        assert status == 2 and str(tmp_path) in err and "does not exist" in err and "--data glyphs" in err
    for spec in ("folder:", "folder:  "):  # not the current folder
        status, _, err = bmssl("train", "--data", spec, "--out", tmp_path / "run", capsys=capsys)
        assert status == 2 and "names no folder" in err
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "no_omniglot"))
    status, _, err = bmssl("train", "--data", "omniglot", "--out", tmp_path / "run", capsys=capsys)
    assert status == 2 and str(tmp_path / "no_omniglot") in err and ENV_VAR in err and "--data glyphs" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["-N", 10, "-K", 3], "--images-per-batch (N=10) must be divisible by --tasks (K=3)"),
    (["-N", 4, "-K", 4], "each task needs >= 2 ways"),
    (["--inner-lr", -1], "--inner-lr must be a finite number > 0"),
    (["--steps", -1], "--steps must be an integer >= 0"),
    (["--test-fraction", 1.5], "--test-fraction must lie in (0.0, 1.0)"),
    (["--delta", 0], "--method bmssl needs --target-steps >= 1"),
    (["--eval-settings", "5way"], "few-shot setting '5way' is not <ways>w<shots>s"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--contrastive-views", "support"], "--contrastive-views support needs --support-views >= 2"),
    (["-N", 400], "exceeds the 96 training images"),
    (["--eval", "--eval-settings", "9w1s"], "--eval-settings 9w1s on the test set"),
    (["--cuda-graph", "--device", "cpu"], "--cuda-graph captures CUDA graphs: it needs a CUDA device"),
])
def test_bad_flag_values_error_clearly(folder, tmp_path, capsys, flags, message):
    status, _, err = bmssl("train", "--data", folder, *TINY, *flags, "--out", tmp_path / "run", capsys=capsys)
    assert status == 2 and message in err and "Traceback" not in err, err


def test_argparse_rejects_malformed_values(capsys):
    status, _, err = bmssl("train", "--steps", "many", "--out", "x", capsys=capsys)
    assert status == 2 and "--steps" in err and "invalid" in err
    status, _, err = bmssl("train", "--method", "maml", "--out", "x", capsys=capsys)
    assert status == 2 and "invalid choice" in err


def test_a_non_finite_loss_stops_and_names_the_step(folder, tmp_path, capsys):
    run = tmp_path / "run"
    status, _, err = bmssl("train", "--data", folder, *TINY, "--dtype", "float32", "-L", 3, "--inner-lr", 1e8,
                           "--steps", 4, "--out", run,
                           capsys=capsys)
    assert status == 2 and "outer step 1" in err and "nan" in err.lower() and "--inner-lr" in err
    payload = results(run)
    assert payload["status"] == "failed" and "outer step 1" in payload["error"]
    assert run_files.load_checkpoint(run)["step"] == 0  # the step-0 checkpoint stands


def test_eval_prints_the_table_for_a_checkpoint_and_the_scratch_baseline(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert bmssl("train", "--data", folder, *TINY, "--steps", 2, "--out", run, capsys=capsys)[0] == 0
    arguments = ["eval", "--checkpoint", run, "--method", "scratch", "--settings", "2w1s", "3w1s",
                 "--episodes", 12, "--queries", 3, "--protocols", "proto", "finetune", "--no-progress"]
    status, out, err = bmssl(*arguments, "--json", tmp_path / "eval.json", capsys=capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert any(line.startswith("2w1s") and "bmssl [run]" in line for line in lines)
    assert any(line.startswith("3w1s") and "scratch [seed 0]" in line for line in lines)
    assert "proto" in out and "finetune" in out and "±" in out
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert len(stored["results"]) == 2 * 2 * 2 and stored["models"]["bmssl [run]"]["step"] == 2
    # Scratch alone, with the architecture given by flags, is the same seeded model: same numbers.
    status, out_alone, err = bmssl("eval", "--method", "scratch", "--data", folder, *TINY[:2], "--image-size", 16,
                                   "--hidden", 4, "--depth", 2, "--projection-dim", 4, "-L", 1,
                                   "--dtype", "float64", "--settings", "2w1s", "3w1s", "--episodes", 12,
                                   "--queries", 3, "--no-progress", capsys=capsys)
    assert status == 0, err
    scratch_rows = [line for line in out.splitlines() if "scratch" in line]
    assert scratch_rows == [line for line in out_alone.splitlines() if "scratch" in line]
    status, _, err = bmssl("eval", "--settings", "5w1s", capsys=capsys)
    assert status == 2 and "nothing to evaluate" in err


def test_eval_refuses_an_infeasible_setting_or_zero_finetune_steps_before_evaluating(folder, tmp_path, capsys):
    """The 300w1s of `--settings 5w1s 5w5s 300w1s` failed only after the first two settings had
    been evaluated (325 s in a review), with no table and no --json; --finetune-steps 0 failed
    after proto, naming inner_steps instead of the flag."""
    scratch = ["eval", "--method", "scratch", "--data", folder, *TINY[:2], "--image-size", 16, "--hidden", 4,
               "--depth", 2, "--episodes", 4, "--queries", 3, "--no-progress"]
    status, out, err = bmssl(*scratch, "--settings", "2w1s", "50w1s", capsys=capsys)
    assert status == 2 and "--settings 50w1s on the test set" in err and "2w1s" not in out, err
    status, out, err = bmssl(*scratch, "--settings", "2w1s", "--finetune-steps", 0, capsys=capsys)
    assert status == 2 and "--finetune-steps 0" in err and "exact chance" in err and out == "", err
    # L = 0 from a run: the finetune protocol's default steps are L
    status, out, err = bmssl(*scratch, "-L", 0, "--settings", "2w1s", capsys=capsys)
    assert status == 2 and "--finetune-steps (default: L = 0)" in err, err
    assert bmssl(*scratch, "-L", 0, "--settings", "2w1s", "--protocols", "proto", capsys=capsys)[0] == 0


@pytest.mark.parametrize("method", ["bmssl", "simclr"])
def test_torchrun_two_gloo_processes_equal_one_process(folder, tmp_path, capsys, method):
    """K = 4 tasks: each of 2 ranks draws the same global batch from the shared seed and keeps 2
    tasks; averaged meta-gradients give the single-process losses and θ (float64, up to the
    summation order). simclr gathers its negatives from both ranks."""
    common = ["--data", folder, *TINY, "-N", 8, "-K", 4, "--steps", 3, "--method", method]
    assert bmssl("train", *common, "--out", tmp_path / "one", capsys=capsys)[0] == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "bmssl", "train", *map(str, common), "--out", str(tmp_path / "two")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert results(tmp_path / "two")["world_size"] == 2
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-12, atol=0)
    one, two = theta(tmp_path / "one"), theta(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-9)


FAILING_RANK = """
import os, sys
from bmssl import cli, meta
original = meta.MetaLearner.step
def step(self, batch):  # rank 1 meets an error in outer step 2 (a bad file, an OOM on one host, ...)
    if os.environ["RANK"] == "1" and self.steps_done == 1:
        raise RuntimeError("injected failure on rank 1")
    return original(self, batch)
meta.MetaLearner.step = step
sys.exit(cli.main())
"""


def test_one_torchrun_rank_failing_ends_the_job_with_its_error(folder, tmp_path):
    """The failing rank leaves at once (no barrier: its peer waits in the next all_reduce), so
    torchrun ends the job in seconds, not at the 2-hour collective timeout, and the failing
    rank's error is printed."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    common = ["--data", folder, *TINY, "-N", 8, "-K", 4, "--steps", 4, "--checkpoint-every", 1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "train", *map(str, common), "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "injected failure on rank 1" in done.stderr and "rank 1 failed in outer step 2" in done.stderr, \
        done.stderr[-3000:]
    record = results(tmp_path / "run")
    assert record["step"] == 1 and record["status"] == "failed"  # rank 0: its all_reduce lost the peer


def test_tasks_must_divide_among_the_torchrun_processes(folder, tmp_path):
    config = TrainConfig(data=folder, channels=1, image_size=16, images_per_batch=6, tasks=3, hidden=4, depth=2)
    with pytest.raises(ValueError, match="must be divisible by the 2 torchrun processes"):
        Run(config, tmp_path, World(rank=0, size=2))


@pytest.mark.skipif(not (DEFAULT_DIR / "images_background_small1.zip").exists()
                    and not os.environ.get(ENV_VAR),
                    reason=f"Omniglot zips absent (expected in {DEFAULT_DIR} or ${ENV_VAR})")
def test_omniglot_trains_on_small1_and_tests_on_alphabets_only_in_small2():
    split = resolve_data(TrainConfig(data="omniglot"))
    assert set(split.train.groups) == {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
    assert set(split.test.groups) == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    assert split.train.image_size == (28, 28) and split.train.channels == 1


@pytest.mark.skipif(not (DEFAULT_DIR / "images_background_small1.zip").exists()
                    and not os.environ.get(ENV_VAR),
                    reason=f"Omniglot zips absent (expected in {DEFAULT_DIR} or ${ENV_VAR})")
def test_omniglot_beside_eval_data_trains_on_small1_and_shared_alphabets_are_refused(folder):
    """--data omniglot --eval-data X trains on images_background_small1, not on the held-out
    alphabets; small1.zip against small2.zip shares Greek and Latin image for image: refused."""
    beside = resolve_data(TrainConfig(data="omniglot", eval_data=folder, channels=1, image_size=16))
    assert set(beside.train.groups) == {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
    assert beside.test.groups == [f"alphabet{g}" for g in range(4)]
    zips = DEFAULT_DIR if (DEFAULT_DIR / "images_background_small1.zip").exists() else Path(os.environ[ENV_VAR])
    with pytest.raises(ValueError, match=r"shares images with .* 50 of its 156 classes \(Greek/character01"):
        resolve_data(TrainConfig(data=str(zips / "images_background_small1.zip"),
                                 eval_data=str(zips / "images_background_small2.zip")))


def test_eval_data_sharing_training_images_is_refused_and_blank_images_do_not_count(folder, tmp_path):
    root = Path(folder[len("folder:"):])
    with pytest.raises(ValueError, match=r"--eval-data folder:.*alphabet2.* 4 of its 4 classes"):
        resolve_data(TrainConfig(data=folder, eval_data=f"folder:{root / 'alphabet2'}", channels=1, image_size=16))
    # two disjoint sets that each hold an all-black image are not a leak
    for name, seed in (("train", 1), ("test", 2)):
        rng = np.random.default_rng(seed)
        for character in range(2):
            target = tmp_path / name / f"c{character}"
            target.mkdir(parents=True)
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(target / "blank.png")
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(target / "noise.png")
    split = resolve_data(TrainConfig(data=f"folder:{tmp_path / 'train'}", eval_data=f"folder:{tmp_path / 'test'}",
                                     channels=1, image_size=16))
    assert len(split.train) == len(split.test) == 4


def test_resume_with_another_eval_data_names_it_in_the_error(folder, tmp_path, capsys):
    """--eval-data may change on --resume when the pool stays the same; when it changes the pool
    (all of --data instead of its training split), the error says so."""
    run, other = tmp_path / "run", tmp_path / "other"
    rng = np.random.default_rng(5)
    for character in range(2):
        (other / f"c{character}").mkdir(parents=True)
        for index in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(other / f"c{character}" / f"{index}.png")
    assert bmssl("train", "--data", folder, *TINY, "--steps", 2, "--out", run, capsys=capsys)[0] == 0
    status, _, err = bmssl("train", "--resume", run, "--eval-data", f"folder:{other}", "--steps", 3, capsys=capsys)
    assert status == 2 and "--eval-data" in err and "the files changed, or --eval-data did" in err


def test_glyph_like_folder_split_is_by_group_and_deterministic(folder):
    config = TrainConfig(data=folder, channels=1, image_size=16, test_fraction=0.25, seed=3)
    first, again = resolve_data(config), resolve_data(config)
    assert first.test.groups == again.test.groups and len(first.test.groups) == 1
    assert not set(first.train.groups) & set(first.test.groups)
    # split_seed (default: seed) alone fixes the split: the training seed does not move it
    pinned = resolve_data(TrainConfig(data=folder, channels=1, image_size=16, test_fraction=0.25, seed=99, split_seed=3))
    assert pinned.test.groups == first.test.groups
    splits = {tuple(resolve_data(TrainConfig(data=folder, channels=1, image_size=16, test_fraction=0.25, seed=3,
                                             split_seed=s)).test.groups) for s in range(8)}
    assert all(len(groups) == 1 for groups in splits) and len(splits) > 1  # other split seeds, other splits


def test_help_lists_train_and_eval(capsys):
    status, out, _ = bmssl("--help", capsys=capsys)
    assert status == 0 and "train" in out and "eval" in out
    status, out, _ = bmssl("train", "--help", capsys=capsys)
    for needle in ("--images-per-batch", "--target-steps", "--resume", "--eval-settings", "--kl-temperature",
                   "default: 40"):
        assert needle in out, needle


def test_resume_into_another_runs_directory_is_refused(folder, tmp_path, capsys):
    """--resume A --out B, where B holds a different run: continuing there would overwrite B."""
    assert bmssl("train", "--data", folder, *TINY, "--steps", 2, "--out", tmp_path / "a", capsys=capsys)[0] == 0
    assert bmssl("train", "--data", folder, *TINY, "--steps", 3, "--out", tmp_path / "b", capsys=capsys)[0] == 0
    before = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    status, _, err = bmssl("train", "--resume", tmp_path / "a", "--out", tmp_path / "b", "--steps", 4, capsys=capsys)
    assert status == 2 and "already holds another run" in err and "Traceback" not in err
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == before
    # into its own directory (named either way) and into a fresh one it continues
    assert bmssl("train", "--resume", tmp_path / "a" / "checkpoint.pt", "--out", tmp_path / "a", "--steps", 3,
                 capsys=capsys)[0] == 0
    assert bmssl("train", "--resume", tmp_path / "a", "--out", tmp_path / "c", "--steps", 4, capsys=capsys)[0] == 0
    assert results(tmp_path / "a")["step"] == 3 and results(tmp_path / "c")["step"] == 4


def test_an_unwritable_out_is_one_line_before_any_work(folder, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file, not a directory"),
                         (tmp_path / "file" / "run", "lies under the file")):
        status, _, err = bmssl("train", "--data", folder, *TINY, "--steps", 2, "--out", out, capsys=capsys)
        assert status == 2 and message in err and "Traceback" not in err, err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        status, _, err = bmssl("train", "--data", folder, *TINY, "--steps", 2, "--out", locked / "run", capsys=capsys)
        assert status == 2 and "cannot write there" in err
    status, out, err = bmssl("eval", "--method", "scratch", "--data", folder, *TINY[:4], "--settings", "2w1s",
                             "--episodes", 2, "--queries", 3, "--json", tmp_path / "file" / "eval.json", capsys=capsys)
    assert status == 2 and "--json" in err and "is a file, not a directory" in err
    assert "few-shot accuracy" not in out  # refused before evaluating


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_checkpoints_and_resume_continues_exactly(folder, tmp_path, signum):
    """SIGINT or SIGTERM mid-run (a real signal to a real process): the step in progress
    finishes, the checkpoint and results.json say "interrupted" at that step, the exit status is
    128 + the signal, and --resume then ends with the losses of an uninterrupted run."""
    common = ["--data", folder, *TINY, "--checkpoint-every", 1000, "--log-every", 1]
    whole = tmp_path / "whole"
    assert bmssl("train", *common, "--steps", 30, "--out", whole)[0] == 0
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "bmssl", "train", *map(str, common), "--steps", "30",
                                "--progress", "--out", str(run)], stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # wait for a few steps: "bmssl: 3/30, ..."
        if line.startswith("bmssl: 3/30"):
            break
    process.send_signal(signum)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 128 + signum, rest
    assert "interrupted by" in rest and f"--resume {run}" in rest
    payload, saved = results(run), run_files.load_checkpoint(run)
    assert payload["status"] == "interrupted" and 3 <= payload["step"] < 30
    assert saved["step"] == payload["step"] and len(payload["history"]) == payload["step"]
    assert bmssl("train", "--resume", run)[0] == 0
    assert losses(run) == losses(whole)


def test_eval_takes_its_own_defaults_not_the_training_runs_evaluation_settings(folder, tmp_path, capsys):
    """`bmssl eval --help` shows defaults (600 episodes, 5w1s 5w5s, proto finetune, 15 queries);
    a run trained with other --eval-settings / --episodes must not change what eval does."""
    run = tmp_path / "run"
    assert bmssl("train", "--data", folder, *TINY, "--steps", 1, "--episodes", 3, "--eval-settings", "3w1s",
                 "--protocols", "proto", "--queries", 2, "--out", run, capsys=capsys)[0] == 0
    status, out, err = bmssl("eval", "--checkpoint", run, "--settings", "2w1s", "--queries", 3, "--no-progress",
                             capsys=capsys)
    assert status == 0, err
    assert "(600 episodes, 3 queries per class" in out and "proto" in out and "finetune" in out
    assert "3w1s" not in out


def test_non_finite_scores_in_eval_are_an_error_not_chance_accuracy(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert bmssl("train", "--data", folder, *TINY, "--steps", 1, "--out", run, capsys=capsys)[0] == 0
    status, out, err = bmssl("eval", "--checkpoint", run, "--settings", "2w1s", "--episodes", 2, "--queries", 3,
                             "--protocols", "finetune", "--finetune-lr", 1e300, "--finetune-steps", 3,
                             "--no-progress", capsys=capsys)
    assert status == 2 and "not finite" in err and "finetune learning rate" in err and "±" not in out


def test_resuming_a_finished_run_keeps_its_evaluation_and_computes_only_what_it_lacks(folder, tmp_path, capsys):
    """--resume of a finished run rewrites results.json: its few-shot rows stay (with --no-eval
    too); --eval adds only the (setting, protocol) pairs missing, with the numbers a fresh run
    gives; other --episodes recompute them all; training further drops them (they are of old θ)."""
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    common = ["--data", folder, *TINY, "--steps", 2, "--eval-settings", "2w1s", "--episodes", 4, "--queries", 3]
    assert bmssl("train", *common, "--eval", "--protocols", "proto", "--out", run, capsys=capsys)[0] == 0
    first = results(run)["eval"]
    assert [row["protocol"] for row in first] == ["proto"]
    status, _, err = bmssl("train", "--resume", run, "--no-eval", capsys=capsys)
    assert status == 0, err
    assert results(run)["status"] == "finished" and results(run)["eval"] == first
    status, out, err = bmssl("train", "--resume", run, "--eval", capsys=capsys)
    assert status == 0 and "not recomputed" in err and "2w1s" in out, err
    assert results(run)["eval"] == first
    status, _, err = bmssl("train", "--resume", run, "--eval", "--protocols", "proto", "finetune", capsys=capsys)
    assert status == 0 and "not recomputed" not in err, err
    both = results(run)["eval"]
    assert both[0] == first[0] and [row["protocol"] for row in both] == ["proto", "finetune"]
    assert bmssl("train", *common, "--eval", "--protocols", "proto", "finetune", "--out", fresh, capsys=capsys)[0] == 0
    assert results(fresh)["eval"] == both
    assert bmssl("train", "--resume", run, "--eval", "--episodes", 5, capsys=capsys)[0] == 0
    assert [(row["protocol"], row["episodes"]) for row in results(run)["eval"]] == [("proto", 5), ("finetune", 5)]
    assert bmssl("train", "--resume", run, "--no-eval", "--steps", 3, capsys=capsys)[0] == 0
    assert results(run)["step"] == 3 and results(run)["eval"] == []


def test_an_out_holding_results_or_curves_without_a_checkpoint_is_refused(folder, tmp_path, capsys):
    """A folder with results.json or curves.png but no checkpoint.pt is no run: neither a new
    run nor a resumed one may overwrite those files."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"my": "results"}')
    (mine / "curves.png").write_text("my figure")
    status, _, err = bmssl("train", "--data", folder, *TINY, "--steps", 1, "--out", mine, capsys=capsys)
    assert status == 2 and "Traceback" not in err, err
    assert f"--out {mine} already holds results.json and curves.png but no checkpoint.pt" in err
    assert (mine / "results.json").read_text() == '{"my": "results"}'
    assert (mine / "curves.png").read_text() == "my figure"
    assert sorted(p.name for p in mine.iterdir()) == ["curves.png", "results.json"]
    (mine / "results.json").unlink()
    run = tmp_path / "run"
    assert bmssl("train", "--data", folder, *TINY, "--steps", 1, "--out", run, capsys=capsys)[0] == 0
    status, _, err = bmssl("train", "--resume", run, "--steps", 2, "--out", mine, capsys=capsys)
    assert status == 2 and "already holds curves.png but no checkpoint.pt" in err, err
    assert sorted(p.name for p in mine.iterdir()) == ["curves.png"] and results(run)["step"] == 1


def test_a_crash_mid_run_is_recorded_as_failed_and_resume_continues_it(folder, tmp_path, capsys, monkeypatch):
    """Any error in a step (here a bad BMSSL_BACKEND) leaves results.json "failed" with the
    error, not "running"; the checkpoint stands and --resume finishes the run as if uninterrupted."""
    common = ["--data", folder, *TINY, "--steps", 3]
    assert bmssl("train", *common, "--out", tmp_path / "whole", capsys=capsys)[0] == 0
    run = tmp_path / "run"
    monkeypatch.setenv("BMSSL_BACKEND", "bogus")
    status, _, err = bmssl("train", *common, "--out", run, capsys=capsys)
    assert status == 2 and "BMSSL_BACKEND='bogus' is not a backend" in err and f"--resume {run}" in err, err
    payload = results(run)
    assert payload["status"] == "failed" and payload["step"] == 0
    assert "ValueError in outer step 1: BMSSL_BACKEND='bogus'" in payload["error"]
    assert f"--resume {run} continues" in payload["error"]
    assert run_files.load_checkpoint(run)["step"] == 0
    monkeypatch.delenv("BMSSL_BACKEND")
    status, _, err = bmssl("train", "--resume", run, capsys=capsys)
    assert status == 0, err
    assert results(run)["status"] == "finished" and "error" not in results(run)
    assert losses(run) == losses(tmp_path / "whole")


def test_plain_progress_lines_come_every_log_every_steps_as_the_readme_says(folder, tmp_path, capsys):
    """Away from a terminal (here: captured stderr) the step bar prints at every --log-every-th
    step and the last one, not by the clock; the README says so."""
    status, _, err = bmssl("train", "--data", folder, *TINY, "--steps", 5, "--log-every", 2, "--progress",
                           "--out", tmp_path / "run", capsys=capsys)
    assert status == 0, err
    assert [line.split(",")[0] for line in err.splitlines() if line.startswith("bmssl: ")] == [
        "bmssl: 2/5", "bmssl: 4/5", "bmssl: 5/5"]
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "the training bar one every `--log-every` steps (default 10) and at the last step" in readme
    assert "print a line every 10 s instead of redrawing" not in readme


def test_steps_shorter_than_the_warmup_warn_and_the_schedule_help_says_its_default(folder, tmp_path, capsys):
    status, _, err = bmssl("train", "--data", folder, *TINY, "--warmup", 5, "--steps", 2, "--out", tmp_path / "a",
                           capsys=capsys)
    assert status == 0, err
    assert "warning: --steps 2 is shorter than the warm-up (--warmup-steps 5)" in err
    assert results(tmp_path / "a")["config"]["schedule_steps"] == 5  # max(--steps, --warmup-steps)
    assert [row["lr"] for row in results(tmp_path / "a")["history"]] == pytest.approx([0.2e-3, 0.4e-3])
    status, _, err = bmssl("train", "--data", folder, *TINY, "--warmup", 2, "--steps", 2, "--out", tmp_path / "b",
                           capsys=capsys)
    assert status == 0 and "shorter than the warm-up" not in err, err
    status, out, _ = bmssl("train", "--help", capsys=capsys)
    assert status == 0
    text = " ".join(out.split())
    assert "(default: the larger of --steps and --warmup-steps, fixed at the first invocation)" in text
    assert "default: --steps of the first invocation" not in text


def test_a_shared_head_finetuned_at_other_ways_is_refused_before_training_and_in_eval(folder, tmp_path, capsys):
    """--head shared meta-learns an N/K-way head (here 3): finetune episodes of other ways are
    refused up front, naming the cause, by bmssl train --eval and by bmssl eval; proto and
    3-way finetune still run."""
    run = tmp_path / "run"
    shared = ["--data", folder, *TINY, "--head", "shared", "--steps", 2, "--episodes", 4, "--queries", 3]
    status, _, err = bmssl("train", *shared, "--eval", "--eval-settings", "2w1s", "3w1s", "--out", run, capsys=capsys)
    assert status == 2 and "Traceback" not in err, err
    assert "--head shared" in err and "3-way head" in err and "--eval-settings 2w1s asks for other ways" in err
    assert not (run / "checkpoint.pt").exists()  # refused before training
    status, out, err = bmssl("train", *shared, "--eval", "--eval-settings", "2w1s", "3w1s", "--protocols", "proto",
                             "--out", run, capsys=capsys)
    assert status == 0 and len(results(run)["eval"]) == 2, err
    evaluation = ["eval", "--checkpoint", run, "--episodes", 4, "--queries", 3, "--no-progress"]
    status, out, err = bmssl(*evaluation, "--settings", "2w1s", "3w1s", "--protocols", "finetune", capsys=capsys)
    assert status == 2 and "few-shot accuracy" not in out, err
    assert f"checkpoint {run / 'checkpoint.pt'} has --head shared" in err and "--settings 2w1s asks" in err
    status, out, err = bmssl(*evaluation, "--settings", "3w1s", "--protocols", "proto", "finetune", capsys=capsys)
    assert status == 0 and "3w1s" in out, err


def test_a_file_that_is_no_checkpoint_is_named_so_without_torch_or_resume_advice(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert bmssl("train", "--data", folder, *TINY, "--steps", 1, "--out", run, capsys=capsys)[0] == 0
    for name, kind in (("results.json", "JSON text"), ("curves.png", "a PNG image")):
        status, _, err = bmssl("eval", "--checkpoint", run / name, "--episodes", 2, capsys=capsys)
        assert status == 2 and "Traceback" not in err, err
        assert f"{run / name} is not a bmssl checkpoint: it is {kind}" in err
        assert f"the checkpoint beside it is {run / 'checkpoint.pt'}" in err
        for advice in ("corrupt", "weights_only", "Resume", "--resume", "--out"):
            assert advice not in err.replace("bmssl train --out RUN_DIR", ""), (advice, err)


def test_eval_json_never_overwrites_a_runs_files(folder, tmp_path, capsys):
    """`--json RUN/checkpoint.pt` replaced the trained θ with the evaluation's JSON."""
    run = tmp_path / "run"
    assert bmssl("train", "--data", folder, *TINY, "--steps", 1, "--out", run, capsys=capsys)[0] == 0
    before = {name: (run / name).read_bytes() for name in run_files.RUN_FILES}
    for name in run_files.RUN_FILES:
        status, out, err = bmssl("eval", "--checkpoint", run, "--settings", "2w1s", "--episodes", 2, "--queries", 3,
                                 "--protocols", "proto", "--no-progress", "--json", run / name, capsys=capsys)
        assert status == 2 and f"would overwrite a file of the run in {run}" in err and out == "", err
    assert {name: (run / name).read_bytes() for name in run_files.RUN_FILES} == before
    assert bmssl("eval", "--checkpoint", run / "checkpoint.pt", "--settings", "2w1s", "--episodes", 2, "--queries", 3,
                 "--protocols", "proto", "--no-progress", "--json", run / "eval.json", capsys=capsys)[0] == 0


def test_a_run_directory_in_use_is_refused_and_an_empty_out_too(folder, tmp_path, capsys):
    """Two `bmssl train --out same` at once both ran to the end; their checkpoints alternated and
    one run was lost. An empty --out (an unset variable) wrote the run into the current folder."""
    run = tmp_path / "run"
    with run_files.RunLock(run):  # another bmssl train holds it
        status, _, err = bmssl("train", "--data", folder, *TINY, "--steps", 1, "--out", run, capsys=capsys)
        assert status == 2 and f"--out {run} is in use by another bmssl train (pid {os.getpid()})" in err, err
    assert not (run / run_files.CHECKPOINT_NAME).exists()
    assert bmssl("train", "--data", folder, *TINY, "--steps", 1, "--out", run, capsys=capsys)[0] == 0
    status, _, err = bmssl("train", "--data", folder, *TINY, "--steps", 1, "--out", "", capsys=capsys)
    assert status == 2 and "--out is empty" in err


def test_a_failing_plot_warns_and_a_failing_checkpoint_is_named_first(folder, tmp_path, capsys, monkeypatch):
    """On a full disk, the final curves.png failed the command (results.json "finished", --eval
    skipped), and in the error handler it hid the checkpoint's failure line."""
    def no_space(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_files, "plot_curves", no_space)
    run = tmp_path / "run"
    status, out, err = bmssl("train", "--data", folder, *TINY, "--steps", 2, "--out", run, "--eval",
                             "--eval-settings", "2w1s", "--episodes", 2, "--queries", 3, "--protocols", "proto",
                             capsys=capsys)
    assert status == 0 and "warning: could not write" in err and "curves.png" in err, err
    assert results(run)["status"] == "finished" and len(results(run)["eval"]) == 1
    saved = run_files.save_checkpoint
    calls = []

    def full_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return saved(*args, **kwargs)

    monkeypatch.setattr(run_files, "save_checkpoint", full_after_one)
    status, _, err = bmssl("train", "--data", folder, *TINY, "--steps", 4, "--checkpoint-every", 2,
                           "--out", tmp_path / "full", capsys=capsys)
    assert status == 2 and "failed in the checkpoint after outer step 2" in err, err
    assert results(tmp_path / "full")["status"] == "failed"


def test_an_abort_records_the_checkpoint_step_and_exits_with_its_signal(folder, tmp_path, capsys, monkeypatch):
    """The second signal: results.json had the aborted step's history (ahead of the checkpoint),
    and a second SIGTERM exited 130 like Ctrl-C; the hint named RUN_DIR literally."""
    from bmssl import training
    from bmssl.interrupt import Abort

    step = training._step

    def abort_at_three(run, bar):
        step(run, bar)
        if run.step == 3:
            raise Abort(signal.SIGTERM)

    monkeypatch.setattr(training, "_step", abort_at_three)
    run = tmp_path / "run"
    status, _, err = bmssl("train", "--data", folder, *TINY, "--steps", 5, "--checkpoint-every", 2, "--out", run,
                           capsys=capsys)
    assert status == 143 and f"continue from its last checkpoint with --resume {run}" in err, err
    payload = results(run)
    assert payload["status"] == "interrupted" and payload["step"] == 2 == run_files.load_checkpoint(run)["step"]
    assert [row["step"] for row in payload["history"]] == [1, 2]


def test_bench_out_that_is_a_folder_is_refused(tmp_path, capsys):
    """`bmssl bench --out results/` wrote results.csv and results.json beside the folder."""
    status, _, err = bmssl("bench", "ntxent", "--quick", "--out", tmp_path, capsys=capsys)
    assert status == 2 and "is a folder; --out is a prefix" in err, err


def test_help_texts_say_what_a_none_default_means(capsys):
    """`bmssl eval --help` showed "(default: None)" for --threads and "without one, None" for
    --split-seed; `bmssl bench ntxent`'s usage errors named the wrong command."""
    for command in ("train", "eval"):
        status, out, _ = bmssl(command, "--help", capsys=capsys)
        assert status == 0 and "None" not in out, [line for line in out.splitlines() if "None" in line]
    status, _, err = bmssl("bench", "ntxent", "--views", 1, capsys=capsys)
    assert status == 2 and err.startswith("usage: bmssl bench ntxent ") and "--views must be >= 2" in err, err
