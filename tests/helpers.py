"""Small utilities shared by tests."""
import importlib.util
import pathlib
import shutil

import torch

TINY = ["--preset", "tiny"]


def load_module_from_file(name, path):
    """Import one file as a module without importing its package (openai-clip's package needs torchvision)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def openai_clip_file(filename):
    """Path of a file inside the installed `openai-clip` distribution, found without importing it."""
    spec = importlib.util.find_spec("clip")
    return pathlib.Path(spec.submodule_search_locations[0]) / filename


def copy_run(base, dest, only=None):
    """A copy of a run folder, or of just the files named in `only`."""
    if only is None:
        shutil.copytree(base, dest)
    else:
        dest.mkdir(parents=True, exist_ok=True)
        for name in only:
            shutil.copy2(base / name, dest / name)
    return dest


def tensors(tree, prefix=""):
    """Every tensor in a nested state dict, by dotted path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    out = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}.{k}"))
    return out


def assert_same_tensors(a, b, what):
    """Bitwise equality of every tensor of two nested state dicts."""
    flat_a, flat_b = tensors(a), tensors(b)
    assert flat_a.keys() == flat_b.keys(), what
    for name in flat_a:
        assert torch.equal(flat_a[name], flat_b[name]), f"{what}{name} differs"
