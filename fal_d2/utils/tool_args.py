"""The command line of fal_d2's tools, in Detectron2's convention.

--config-file FILE, then config overrides as KEY VALUE pairs (the weights as MODEL.WEIGHTS, the
device as MODEL.DEVICE) after --opts, as Detectron2's demo takes them, or at the end of the line,
as its train_net takes them; --output for what is written. At the end of the line they stay
overrides even after an option that takes a list (--input a.jpg MODEL.WEIGHTS w.pth), which
argparse alone would give to the list: a trailing pair is recognised by its key, a name under one
of the config's top-level keys (MODEL, SOLVER, ...). Old flags stay as aliases that print one
deprecation line.
"""
import argparse
import functools
import re
import sys
from typing import List, Optional, Sequence, Tuple

__all__ = ["ToolArgumentParser", "split_overrides", "override_value", "without_override"]

_CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")
_ALIAS_OVERRIDES = "_deprecated_overrides"  # namespace attribute the aliases of keys fill


@functools.lru_cache(maxsize=None)
def _config_roots() -> frozenset:
    from detectron2.config import get_cfg

    from fal_d2.config import add_fal_config

    cfg = get_cfg()
    add_fal_config(cfg)
    return frozenset(cfg.keys())


def _is_config_key(token: str) -> bool:
    return bool(_CONFIG_KEY.match(token)) and token.split(".")[0] in _config_roots()


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the arguments, the config overrides) of a command line: everything after "--opts", else
    the longest run of KEY VALUE pairs at its end whose keys are config keys."""
    argv = list(argv)
    if "--opts" in argv:
        start = argv.index("--opts")
        return argv[:start], argv[start + 1:]
    start = len(argv)
    while start >= 2 and _is_config_key(argv[start - 2]) and not argv[start - 1].startswith("--"):
        start -= 2
    return argv[:start], argv[start:]


def override_value(opts: Sequence[str], key: str, default: Optional[str] = None) -> Optional[str]:
    """The value the KEY VALUE list ``opts`` gives ``key`` (its last one, which wins)."""
    values = [value for name, value in zip(opts[::2], opts[1::2]) if name == key]
    return values[-1] if values else default


def without_override(opts: Sequence[str], key: str) -> List[str]:
    """The KEY VALUE list ``opts`` without the pairs of ``key``."""
    return [item for name, value in zip(opts[::2], opts[1::2]) if name != key
            for item in (name, value)]


class _DeprecatedOverride(argparse.Action):
    """``--flag VALUE`` read as the override ``KEY VALUE``, with one deprecation line."""

    def __init__(self, option_strings, dest, key, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                         **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use --opts {self.key} {values}",
              file=sys.stderr)
        overrides = getattr(namespace, _ALIAS_OVERRIDES, [])
        setattr(namespace, _ALIAS_OVERRIDES, overrides + [self.key, values])


class _DeprecatedAlias(argparse.Action):
    """An old name of an option, with one deprecation line."""

    def __init__(self, option_strings, dest, replacement, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


class ToolArgumentParser(argparse.ArgumentParser):
    """
    An ArgumentParser whose ``--help`` shows the tool's docstring as written (its examples
    included) and which, once :meth:`add_overrides_argument` is called, returns the config
    overrides in ``args.opts``: those after --opts, those at the end of the line and those of
    deprecated flags (:meth:`add_deprecated_override`), in this order.
    """

    def __init__(self, description: str, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)
        self._takes_overrides = False

    def add_config_arguments(self, **config_file):
        """--config-file (``config_file``: its add_argument keywords) and the overrides."""
        config_file.setdefault("required", "default" not in config_file)
        self.add_argument("--config-file", metavar="FILE", **config_file)
        self.add_overrides_argument()

    def add_overrides_argument(self):
        self.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                          help="config overrides, e.g. MODEL.WEIGHTS model.pth MODEL.DEVICE cpu; "
                               "last on the line, where the pairs also work without --opts")
        self._takes_overrides = True

    def add_deprecated_override(self, flag: str, key: str, **kwargs):
        """``flag VALUE``, an old spelling of the override ``key VALUE``."""
        if not self._takes_overrides:
            raise ValueError(f"{flag}: call add_overrides_argument first")
        kwargs.setdefault("help", f"deprecated: use --opts {key} {kwargs.get('metavar', 'VALUE')}")
        self.add_argument(flag, action=_DeprecatedOverride, key=key, **kwargs)

    def add_deprecated_alias(self, flag: str, replacement: str, dest: str, **kwargs):
        """``flag``, an old name of option ``replacement`` (whose ``dest`` it fills)."""
        self.add_argument(flag, action=_DeprecatedAlias, replacement=replacement, dest=dest,
                          default=argparse.SUPPRESS, help=f"deprecated: use {replacement}",
                          **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if not self._takes_overrides:
            return super().parse_known_args(args, namespace)
        args, overrides = split_overrides(args)
        bad_keys = [key for key in overrides[::2] if key.startswith("-")]
        if bad_keys or len(overrides) % 2:
            self.error(f"config overrides come in KEY VALUE pairs, last on the line; got "
                       f"{' '.join(overrides)}")
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.opts = (list(getattr(namespace, "opts", None) or []) + overrides
                          + namespace.__dict__.pop(_ALIAS_OVERRIDES, []))
        return namespace, extras
