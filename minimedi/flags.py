"""The command line: one flag per config field, every value checked before any work starts.

A field's flag is `--<name>`, or the `flag=` of its metadata when the bare name would be ambiguous on a
command line (`--align-steps`, `--cls-width`). `parse_config(argv, sections=...)` reads `--preset` first,
so `--help` shows that preset's values; then every flag of `sections`; then the stated range or choices
of every value, turning the first bad one into one line and exit code 2.
"""
import argparse
import dataclasses
import sys
import typing

from minimedi.config import PRESETS, SECTIONS, make_config

BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
          "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def flag_name(f):
    """The command-line flag of a dataclass field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


# ---- validation: every value checked before any work ---------------------------------------------

def field_errors(section):
    """'--flag value: must be ...' for every field of a config section outside its stated range."""
    errors = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, tuple) else (value,)
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            errors.append(f"{flag_name(f)} {value}: choose one of {', '.join(map(str, f.metadata['choices']))}")
        for key, (sign, ok) in BOUNDS.items():
            bound = f.metadata.get(key)
            if bound is not None and any(v is not None and not ok(v, bound) for v in values):
                shown = " ".join(map(str, values))
                errors.append(f"{flag_name(f)} {shown}: must be {sign} {bound}")
        if isinstance(value, float) and value != value:
            errors.append(f"{flag_name(f)} nan: not a number")
    return errors


# ---- the command line ------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _add_field(group, section, f, typ, default):
    flags = [flag_name(f), *f.metadata.get("aliases", ())]
    kwargs = {"help": f"{f.metadata.get('help', '')} [{default}]", "dest": f"{section}.{f.name}"}
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    if typ is bool:
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, **kwargs)
    elif typ is tuple:
        group.add_argument(*flags, type=int, nargs="+", default=default, **kwargs)
    elif typ is list:
        group.add_argument(*flags, action="append", default=None, **kwargs)
    else:
        if typing.get_origin(typ) is typing.Union:  # Optional[X]
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        group.add_argument(*flags, type=typ, default=default, **kwargs)


def build_parser(cfg, sections, description=""):
    """An argparse parser with one flag per field of the named sections, defaulting to `cfg`'s values."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), default=cfg.preset, help="named preset [%(default)s]")
    for s in sections:
        section = getattr(cfg, s)
        group = parser.add_argument_group(s)
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            _add_field(group, s, f, hints[f.name], getattr(section, f.name))
    return parser


def parse_config(argv=None, sections=SECTIONS, description=""):
    """Parse `argv` into a Config: preset first, then every flag of `sections` on top of it, then the
    range check of every value (one line and exit code 2 for the first bad one)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = _Parser(add_help=False)
    pre.add_argument("--preset", choices=tuple(PRESETS), default="default")
    preset = pre.parse_known_args(argv)[0].preset
    cfg = make_config(preset)
    parser = build_parser(cfg, sections, description)
    args = parser.parse_args(argv)
    for s in sections:
        section = getattr(cfg, s)
        hints = typing.get_type_hints(type(section))
        values = {}
        for f in dataclasses.fields(section):
            v = getattr(args, f"{s}.{f.name}")
            if hints[f.name] is tuple:
                v = tuple(v)
            elif hints[f.name] is list and v is None:  # an `append` flag never given
                v = getattr(section, f.name)
            values[f.name] = v
        setattr(cfg, s, dataclasses.replace(section, **values))
        errors = field_errors(getattr(cfg, s))
        if errors:
            parser.error(errors[0])
    return cfg
