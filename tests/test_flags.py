"""Every numeric flag of every script, with its invalid values: one line on stderr and exit code 2, before
any work (the run folder stays empty). The table is generated from the config's own range metadata, so a
new flag is covered the day it is added."""
import dataclasses
import typing

import pytest

import align
import sample
import train
from minimedi import evaluate, export, sr_eval
from minimedi.config import Config
from minimedi.errors import run_main
from minimedi.flags import BOUNDS, flag_name

SCRIPTS = {"train.py": (train.main, train.SECTIONS), "align.py": (align.main, align.SECTIONS),
           "sample.py": (sample.main, sample.SECTIONS), "evaluate": (evaluate.main, evaluate.SECTIONS),
           "export": (export.main, export.SECTIONS), "sr_eval": (sr_eval.main, sr_eval.SECTIONS)}


def argv(script, tmp_path, *flags):
    prompt = ["--prompt", "x"] if script == "sample.py" else []
    return ["--preset", "tiny", "--run", str(tmp_path), *prompt, *flags]


def invalid_values(f, typ):
    """Values just outside the field's stated range, and values of the wrong kind."""
    number = int if typ in (int, tuple) else float
    values = ["x"] if typ is int or typ is tuple else ["x", "nan"]
    for key in BOUNDS:
        bound = f.metadata.get(key)
        if bound is not None:
            step = 1 if number is int else 0.5
            values.append(str(number(bound - step if key in ("ge", "gt") else bound + step)))
            if key in ("gt", "lt"):
                values.append(str(number(bound)))
    return values


def cases():
    for script, (_, sections) in SCRIPTS.items():
        for section in sections:
            obj = getattr(Config(), section)
            hints = typing.get_type_hints(type(obj))
            for f in dataclasses.fields(obj):
                typ = hints[f.name]
                if typing.get_origin(typ) is typing.Union:
                    typ = next(a for a in typing.get_args(typ) if a is not type(None))
                if typ in (int, float, tuple):
                    for value in invalid_values(f, typ):
                        yield pytest.param(script, flag_name(f), value, id=f"{script} {flag_name(f)} {value}")


def test_the_table_covers_every_bounded_flag():
    flags = {p.values[1] for p in cases()}
    assert {"--ckpt-every", "--log-every", "--lora-rank", "--align-batch", "--eval-n", "--target-female",
            "--clip-width", "--sr-size", "--sr-crop", "--sr-steps", "--sr-aug-max", "--sr-aug-level",
            "--sr-sample-steps", "--sr-guidance", "--sr-eval-n", "--sr-eval-feature-steps"} <= flags


@pytest.mark.parametrize("script, flag, value", list(cases()))
def test_every_invalid_numeric_value_is_one_line_and_exit_2(script, flag, value, tmp_path, capsys):
    main, _ = SCRIPTS[script]
    with pytest.raises(SystemExit) as stop:
        run_main(main, argv(script, tmp_path, flag, value))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and flag in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script, flags, message", [
    ("train.py", ["--clip", "/no/such/weights.pt"], "--clip /no/such/weights.pt: no such file"),
    ("train.py", ["--labels", "/no/such.csv"], "--labels /no/such.csv: no such file"),
    ("train.py", ["--data", "roco:/no/such/dir"], "is not a directory"),
    ("train.py", ["--data", "imagenet"], "expected phantom or roco:PATH or rocov2:PATH"),
    ("train.py", ["--target", "brats:."], "needs --labels CSV"),
    ("train.py", ["--device", "tpu"], "--device tpu"),
    ("train.py", ["--image-size", "18", "--dim-mults", "1", "2", "4"], "cannot be halved"),
    ("train.py", ["--image-size", "20"], "--clip-patch 8 does not divide the image size 20"),
    ("train.py", ["--clip-width", "100", "--clip-head-dim", "32"], "does not split into 3 heads"),
    ("train.py", ["--task", "sr"], "--task sr needs a base model"),
    ("align.py", ["--align-batch", "6", "--align-per-prompt", "4"], "not a multiple of --align-per-prompt 4"),
    ("sample.py", ["--model", "/no/such/folder"], "not diffusion, aligned or an exported model folder"),
    ("export", ["--model", "aligned"], "give --out"),
    ("sr_eval", [], "python train.py --task sr"),
])
def test_bad_paths_and_shapes_are_one_line_and_exit_2(script, flags, message, tmp_path, capsys):
    main, _ = SCRIPTS[script]
    with pytest.raises(SystemExit) as stop:
        run_main(main, argv(script, tmp_path, *flags))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not list(tmp_path.iterdir())
