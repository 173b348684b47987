"""`bmssl eval`: few-shot accuracy of saved θs (and of a random init) on held-out classes.

    bmssl eval --checkpoint runs/bmssl --method scratch --settings 5w1s 5w5s --episodes 600 \\
        --protocols proto finetune --json eval.json

Every model sees the same episodes (one --eval-seed). The test set is the held-out split of the
first checkpoint's data (its --data, --split-seed, ...) unless the data flags say otherwise; a
checkpoint trained with other test groups draws a warning. The evaluation flags (--settings,
--episodes, --protocols, --queries, ...) and --device, --dtype, --threads take the defaults shown
in --help, not the training run's. `--method scratch` adds θ drawn at
random from --seed with the first checkpoint's architecture (or the model flags, without one).
Results are mean accuracy ± the 95% half-width 1.96·std/√episodes (bmssl.eval.evaluate).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from bmssl import run_files
from bmssl.eval import evaluate
from bmssl.models import BACKBONES, NORMS
from bmssl.training import (ALIASES, DATA_HELP, DTYPES, TrainConfig, _optional_float, add_eval_arguments, build_learner,
                            check_eval_feasible, check_finetune_steps, check_shared_head, flag, parse_settings,
                            resolve_data, resolve_device)

# Flags of `bmssl eval` that set TrainConfig fields (data, model for scratch, evaluation, device).
DATA_FIELDS = ("data", "eval_data", "image_size", "channels", "test_fraction", "split_seed")
MODEL_FIELDS = ("backbone", "hidden", "depth", "widths", "norm", "projection_dim", "projection_hidden",
                "inner_steps", "inner_lr")
# Flags that do not come from the checkpoint: the defaults shown in --help unless given.
EVAL_FIELDS = ("eval_settings", "episodes", "protocols", "queries", "eval_batch", "eval_seed", "finetune_steps",
               "finetune_lr")
RUN_FIELDS = ("device", "dtype", "threads", "progress")


def evaluate_models(models: dict, test, config: TrainConfig, show_progress: bool = True) -> list:
    """Few-shot accuracy of each model (name -> MetaLearner) on the ImageSet `test`, for every
    setting and protocol of `config`. Returns rows {model, setting, ways, shots, protocol,
    queries, episodes, mean, ci95} (accuracies as fractions)."""
    reference = next(next(iter(models.values())).model.parameters())
    images = test.float(reference.device, reference.dtype)
    rows = []
    for ways, shots in parse_settings(config.eval_settings):
        for name, learner in models.items():
            for protocol in config.protocols:
                result = evaluate(learner, images, test.labels, protocol, ways, shots, config.queries,
                                  config.episodes, config.eval_seed, config.eval_batch,
                                  inner_steps=config.finetune_steps, inner_lr=config.finetune_lr,
                                  show_progress=show_progress)
                rows.append({"model": name, "setting": f"{ways}w{shots}s", "ways": ways, "shots": shots,
                             "protocol": protocol, "queries": config.queries, "episodes": config.episodes,
                             "mean": result.mean, "ci95": result.ci95})
    return rows


def format_table(rows: list, title: str = "") -> str:
    """One line per (setting, model), one column per protocol: "mean ± ci95" in percent."""
    protocols = list(dict.fromkeys(row["protocol"] for row in rows))
    keys = list(dict.fromkeys((row["setting"], row["model"]) for row in rows))
    cells = {(row["setting"], row["model"], row["protocol"]): f"{100 * row['mean']:6.2f} ± {100 * row['ci95']:.2f}"
             for row in rows}
    model_width = max([len("model")] + [len(model) for _, model in keys])
    header = f"{'setting':<8} {'model':<{model_width}}  " + "  ".join(f"{p:<15}" for p in protocols)
    lines = [title] if title else []
    if rows:
        lines.append(f"({rows[0]['episodes']} episodes, {rows[0]['queries']} queries per class, mean ± 95% CI)")
    lines += [header.rstrip(), "-" * len(header.rstrip())]
    for setting, model in keys:
        lines.append((f"{setting:<8} {model:<{model_width}}  "
                      + "  ".join(f"{cells.get((setting, model, p), 'n/a'):<15}" for p in protocols)).rstrip())
    return "\n".join(lines)


def add_eval_command_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    S = argparse.SUPPRESS

    def add(group, name, help, inherited=False, **kwargs):
        """inherited: a data or model flag, whose default is the first checkpoint's value."""
        names = [flag(name)] + ALIASES.get(name, []) + (["--settings"] if name == "eval_settings" else [])
        if name == "eval":
            return
        if "type" in kwargs and "metavar" not in kwargs and "choices" not in kwargs:
            kwargs["metavar"] = "FLOAT" if kwargs["type"] in (float, _optional_float) else "INT"
        if "default:" in help:
            shown = ""
        elif inherited:
            shown = f" (default: the first checkpoint's; without one, {_shown(name, d)})"
        else:
            shown = f" (default: {_shown(name, d)})"
        group.add_argument(*names, dest=name, default=S, help=help + shown, **kwargs)

    def inherit(group, name, help, **kwargs):
        add(group, name, help, inherited=True, **kwargs)

    models = parser.add_argument_group("models (the scratch model's flags default to the first checkpoint's)")
    models.add_argument("--checkpoint", nargs="+", default=[], metavar="PATH",
                        help="run directories or checkpoint files of `bmssl train`")
    models.add_argument("--method", choices=["scratch"], default=None,
                        help="also evaluate a random initialisation (the scratch baseline), drawn from --seed")
    models.add_argument("--seed", type=int, default=0, help="seed of the scratch model (default: 0)")
    inherit(models, "backbone", "scratch model's backbone", choices=BACKBONES)
    inherit(models, "hidden", "scratch model's conv4 channels", type=int)
    inherit(models, "depth", "scratch model's conv4 blocks", type=int)
    inherit(models, "widths", "scratch model's resnet12 widths", type=int, nargs="+")
    inherit(models, "norm", "scratch model's normalisation", choices=NORMS)
    inherit(models, "projection_dim", "scratch model's projection size", type=int)
    inherit(models, "inner_steps", "scratch model's L (finetune's default steps)", type=int)
    inherit(models, "inner_lr", "scratch model's α (finetune's default learning rate)", type=float)

    data = parser.add_argument_group("data (default: the first checkpoint's)")
    inherit(data, "data", DATA_HELP, metavar="SPEC")
    inherit(data, "eval_data", "test on all of this spec instead of the held-out split of --data (refused when a test "
        "image is also a training image)", metavar="SPEC")
    inherit(data, "image_size", "image side in pixels", type=int)
    inherit(data, "channels", "folder: data only: 1 or 3", type=int)
    inherit(data, "test_fraction", "fraction of the groups held out", type=float)
    inherit(data, "split_seed", "seed of the train/test split", type=int)

    evaluation = parser.add_argument_group("evaluation")
    add_eval_arguments(evaluation, add)
    evaluation.add_argument("--json", default=None, metavar="PATH", help="also write the results here (JSON)")
    run = parser.add_argument_group("run")
    add(run, "device", "auto, cpu, cuda or cuda:N")
    add(run, "dtype", "model and image dtype", choices=tuple(DTYPES))
    add(run, "threads", "torch CPU threads", type=int)
    add(run, "progress", "show progress bars", action=argparse.BooleanOptionalAction)


# What a None default means, for --help (it printed "without one, None")
NONE_MEANS = {"threads": "torch's choice", "split_seed": "the training seed, 0", "widths": "resnet12's own",
              "eval_data": "the held-out split of --data"}


def _shown(name, defaults):
    value = getattr(defaults, name)
    if value is None:
        return NONE_MEANS.get(name, "none")
    return " ".join(map(str, value)) if isinstance(value, tuple) else value


def main(args: argparse.Namespace) -> int:
    """`bmssl eval`."""
    given = {name: value for name, value in vars(args).items()
             if name in TrainConfig.__dataclass_fields__ and name not in ("seed", "method")}
    given = {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()}
    if not args.checkpoint and args.method != "scratch":
        raise ValueError("nothing to evaluate: give --checkpoint RUN_DIR [...] and/or --method scratch")
    if args.json:  # before the evaluation, not after it
        if Path(args.json).expanduser().is_dir():
            raise ValueError(f"--json {args.json} is a directory; give a file path")
        _check_not_a_run_file(Path(args.json).expanduser(), args.checkpoint)
        run_files.writable_directory(Path(args.json).expanduser().parent, "the folder of --json")
    states = [run_files.load_checkpoint(path) for path in args.checkpoint]
    base = TrainConfig()
    if states:  # the first run's data and model; the evaluation and run flags keep their own defaults
        saved = TrainConfig.from_dict(states[0]["config"])
        base = replace(saved, **{name: getattr(base, name) for name in EVAL_FIELDS + RUN_FIELDS})
    base = replace(base, **given).validate()
    checked = [(TrainConfig.from_dict(state["config"]), f"checkpoint {state['path']}") for state in states]
    if args.method == "scratch":
        checked.append((replace(base, method="scratch"), "the scratch model (the first checkpoint's architecture)"))
    for config, what in checked:  # before reading the data
        check_shared_head(config, base.eval_settings, base.protocols, what, "--settings")
        check_finetune_steps(config, base.finetune_steps, base.protocols, what)
    if base.threads:
        torch.set_num_threads(base.threads)
    data = resolve_data(base, show_progress=base.progress)
    check_eval_feasible(base, data.test, "--settings")  # before the first evaluation, not after some
    image_shape = (data.test.channels, *data.test.image_size)
    device, dtype = resolve_device(base.device), DTYPES[base.dtype]

    models, described = {}, {}
    for state in states:
        config = TrainConfig.from_dict(state["config"])
        saved_shape = tuple(state["data"].get("image_shape", image_shape))
        if saved_shape != image_shape:
            raise ValueError(f"{state['path']} was trained on {saved_shape} images but the test images are "
                             f"{image_shape}; pass the run's --data / --image-size / --channels")
        if sorted(state["data"].get("test_groups", [])) != sorted(data.test.groups):
            print(f"warning: {state['path']} held out the groups {state['data'].get('test_groups')}, not the "
                  f"test groups used here ({data.test.groups}): it may have trained on test classes",
                  file=sys.stderr)
        learner = build_learner(config, image_shape, device, dtype)
        learner.load_state_dict(state["learner"])
        name = _unique(f"{config.method} [{Path(state['path']).parent.name}]", models)
        models[name] = learner
        described[name] = {"checkpoint": state["path"], "method": config.method, "step": int(state["step"])}
    if args.method == "scratch":
        config = replace(base, method="scratch", seed=args.seed)
        name = _unique(f"scratch [seed {args.seed}]", models)
        models[name] = build_learner(config, image_shape, device, dtype)
        described[name] = {"checkpoint": None, "method": "scratch", "seed": args.seed}

    rows = evaluate_models(models, data.test, base, show_progress=base.progress)
    print(format_table(rows, f"few-shot accuracy (%) on {data.test.summary()}"))
    if args.json:
        run_files.write_json(args.json, {"data": data.description, "test": data.test.summary(), "models": described,
                                         "eval_seed": base.eval_seed, "results": rows})
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _check_not_a_run_file(target: Path, checkpoints) -> None:
    """ValueError when --json would overwrite a checkpoint given to evaluate, or a run's
    checkpoint.pt / results.json / curves.png (`--json RUN/checkpoint.pt` replaced θ)."""
    resolved = target.resolve()
    given = {Path(c).expanduser().resolve() for c in checkpoints}
    given |= {c / run_files.CHECKPOINT_NAME for c in given}
    in_a_run = resolved.name in run_files.RUN_FILES and (resolved.parent / run_files.CHECKPOINT_NAME).exists()
    if resolved in given or in_a_run:
        raise ValueError(f"--json {target} would overwrite a file of the run in {resolved.parent} "
                         f"({resolved.name}); give another file name, e.g. {resolved.parent / 'eval.json'}")


def _unique(name: str, taken: dict) -> str:
    candidate, index = name, 2
    while candidate in taken:
        candidate, index = f"{name} #{index}", index + 1
    return candidate
