"""Typed, validated YAML configs: the machinery every entry script shares.

A run config is a pydantic model (``extra="forbid"``, strict types) assembled from groups: the
architecture groups live next to the models they build (``models.blip.BlipArch``, ...), the
task-agnostic ones in ``utils/settings.py`` (``OptimSettings``, ``LoopSettings``, ...), and each
task's schema in its ``tasks/`` module combines them. Keys stay flat, exactly as in BLIP's YAML files.

``load_config`` reads the file with ruamel.yaml in round-trip mode (so its comments survive into the
copy saved next to a run's outputs), applies ``--opts key=value`` overrides, validates, and turns
every pydantic error into one line that names the key and where its value came from::

    unknown config key 'init_l' in configs/x.yaml; did you mean 'init_lr'?
    invalid value for config key 'vit_ckpt_layer' in --opts: must be in [0, 2], got 4

A setting that the run does not use (``unused`` in the validation context, e.g. gradient
checkpointing under ``--evaluate``) is not checked against the rest of the config.
"""
from __future__ import annotations

import argparse
import difflib
import logging
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from utils.errors import UserError
from utils.logging import set_debug

logger = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit its schema; the message names the key."""


# ----------------------------------------------------------------------------- field types

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]          # [0, 1]
Fraction = Annotated[float, Field(gt=0, le=1)]           # (0, 1]
Probability = Annotated[float, Field(ge=0, lt=1)]        # [0, 1): dropout, drop path
Device = Annotated[str, Field(pattern=r'^(auto|cpu|mps|cuda(:\d+)?)$')]


class Config(BaseModel):
    """Base of every config group: unknown keys are errors and types are strict (``true`` is no
    int, ``'1e-5'`` no float). Validation happens once, when the config is loaded; validators may
    then resolve defaults in place (assignments are not re-validated)."""
    model_config = ConfigDict(extra='forbid', strict=True)


def unused(info: ValidationInfo) -> frozenset:
    """The keys the current run does not use (from the validation context)."""
    return frozenset((info.context or {}).get('unused', ()))


# ----------------------------------------------------------------------------- errors

class _Origins:
    """Which source set each dotted key, so an error points at the file or at --opts."""

    def __init__(self, default: str):
        self.default = default
        self.by_key: Dict[str, str] = {}

    def mark(self, key: str, label: str) -> None:
        self.by_key[key] = label

    def of(self, key: str) -> str:
        # The longest marked prefix wins: `vit={...}` from --opts owns `vit.width` too.
        best = max((k for k in self.by_key if key == k or key.startswith(k + '.')
                    or key.startswith(k + '[')), key=len, default=None)
        return self.by_key[best] if best is not None else self.default


_EXPECTED = {'int': 'int', 'float': 'float', 'bool': 'bool', 'string': 'str', 'list': 'list',
             'dict': 'mapping', 'model': 'mapping'}


def _model_at(schema: type, path: List[Any]) -> Optional[type]:
    """The config model reached by following the field names ``path`` from ``schema`` (or None)."""
    for part in path:
        field = getattr(schema, 'model_fields', {}).get(part)
        args = getattr(field.annotation, '__args__', None) or (field.annotation,) if field else ()
        schema = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return schema


def _key(schema: type, loc: tuple) -> tuple[str, List[Any]]:
    """pydantic's ``loc`` -> dotted key, without union-member tags (``'ViTArch'``, ``'str'``, ...)."""
    parts: List[Any] = []
    for part in loc:
        model = _model_at(schema, [p for p in parts if isinstance(p, str)])
        tag = isinstance(part, str) and ('[' in part or part[:1].isupper() or part in ('str', 'int', 'float'))
        if isinstance(part, int) or (model is not None and part in model.model_fields) or not tag:
            parts.append(part)  # a field, a list index, an unknown key, or a mapping's key
    key = ''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in parts).lstrip('.')
    return key, parts


def _message(schema: type, err: dict, origins: _Origins) -> tuple[int, str]:
    """(specificity, one line) for one pydantic error."""
    key, parts = _key(schema, err['loc'])
    where, kind, value = origins.of(key), err['type'], err.get('input')
    parent = _model_at(schema, [p for p in parts[:-1] if isinstance(p, str)]) or schema
    if kind == 'extra_forbidden':
        names, prefix = list(parent.model_fields), key.rpartition('.')[0]
        close = difflib.get_close_matches(str(parts[-1]), names, n=1, cutoff=0.6)
        hint = (f"did you mean {'.'.join(filter(None, [prefix, close[0]]))!r}?" if close
                else f"valid keys{f' under {prefix!r}' if prefix else ''}: {', '.join(names)}")
        return len(parts), f'unknown config key {key!r} in {where}; {hint}'
    if kind == 'missing':
        annotation = parent.model_fields[parts[-1]].annotation
        return len(parts), (f'missing required config key {key!r} '
                            f"({getattr(annotation, '__name__', annotation)}) in {where}")
    base = kind.split('_')[0]
    if kind.endswith(('_type', '_parsing')) and base in _EXPECTED:
        expected = _EXPECTED[base]
    elif kind == 'literal_error':
        expected = 'one of ' + err['ctx']['expected'].replace(' or ', ', ')
    else:
        expected = None
    if expected:
        return len(parts), f'config key {key!r} in {where}: expected {expected}, got {type(value).__name__} {value!r}'
    if kind == 'value_error':  # our validators word their message as '<field>: <what is wrong>'
        text = str(err['ctx']['error'])
        name, sep, rest = text.partition(': ')
        if sep and name.isidentifier():
            key = f'{key}.{name}' if key else name
            where, text = origins.of(key), rest
        return len(parts) + 1, f'invalid value for config key {key!r} in {where}: {text}'
    # Constraint errors (ge, gt, pattern, ...): pydantic's wording, as a value error.
    msg = err['msg'][:1].lower() + err['msg'][1:]
    return len(parts), f'invalid value for config key {key!r} in {where}: {msg}, got {value!r}'


def _config_error(schema: type, exc: ValidationError, origins: _Origins) -> ConfigError:
    # A union (vit: 'base' | mapping) reports one error per member: keep the most specific per key.
    best: Dict[str, tuple[int, str]] = {}
    for err in exc.errors(include_url=False):
        depth, text = _message(schema, err, origins)
        head = str(err['loc'][0]) if err['loc'] else ''
        if head not in best or depth > best[head][0]:
            best[head] = (depth, text)
    return ConfigError('; '.join(dict.fromkeys(text for _, text in best.values())))


# ----------------------------------------------------------------------------- documents

def _scalar(value: Any) -> Any:
    """ruamel's formatting-preserving scalars -> builtins (ScalarBoolean is an int subclass)."""
    if isinstance(value, ScalarBoolean):
        return bool(value)
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def _plain(value: Any) -> Any:
    """Config models, ruamel nodes and scalars -> plain nested dicts/lists/builtins."""
    if isinstance(value, BaseModel):
        return _plain(value.model_dump())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return _scalar(value)


def _yaml() -> YAML:
    yaml = YAML(typ='rt')  # round-trip: keeps comments, key order and number formatting
    yaml.indent(mapping=2, sequence=4, offset=2)
    # `val_file: null` rather than ruamel's bare `val_file:`, which reads like a forgotten value.
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar('tag:yaml.org,2002:null', 'null'))
    return yaml


def _to_yaml(value: Any) -> Any:
    """Plain data -> ruamel nodes, so comments can later be attached anywhere in the document."""
    value = _plain(value)
    if isinstance(value, dict):
        return CommentedMap((k, _to_yaml(v)) for k, v in value.items())
    if isinstance(value, list):
        return CommentedSeq(_to_yaml(v) for v in value)
    return value


def _read(path: Path, label: str) -> CommentedMap:
    try:
        doc = _yaml().load(path.read_text())
    except YAMLError as err:
        raise ConfigError(f'cannot parse {label}: {err}') from None
    if doc is None:
        return CommentedMap()  # an empty file sets nothing
    if not isinstance(doc, Mapping):
        raise ConfigError(f'{label} must hold a mapping of config keys, got {type(doc).__name__}')
    return doc


def _join(prefix: str, name: Any) -> str:
    return f'{prefix}.{name}' if prefix else str(name)


def _fill_under(node: CommentedMap, base: Mapping, prefix: str, origins: _Origins, label: str) -> None:
    """Copy keys of `base` that `node` lacks (deep): a lower-priority layer of values."""
    for name, value in base.items():
        key = _join(prefix, name)
        if name not in node:
            node[name] = _to_yaml(value)
            origins.mark(key, label)
        elif isinstance(node[name], Mapping) and isinstance(value, Mapping):
            _fill_under(node[name], value, key, origins, label)


def _parse_opt(opt: str) -> tuple[List[str], Any]:
    key, sep, text = opt.partition('=')
    parts = key.strip().split('.')
    if not sep or not all(parts):
        raise ConfigError(f'--opts entry {opt!r} is not key=value (dotted keys for nesting)')
    if not text.strip():
        return parts, ''  # `pretrained=` means the empty string, not null
    try:
        return parts, _yaml().load(text)  # YAML typing: 32 -> int, false -> bool, [a, b] -> list
    except YAMLError as err:
        raise ConfigError(f'cannot parse --opts value for {key!r}: {text!r} ({err})') from None


def _apply_opts(doc: CommentedMap, opts: List[str], origins: _Origins) -> None:
    for opt in opts:
        parts, value = _parse_opt(opt)
        node = doc
        for i, part in enumerate(parts[:-1]):
            sub = '.'.join(parts[:i + 1])
            if node.get(part) is None:
                node[part] = CommentedMap()
                origins.mark(sub, '--opts')  # created here: nothing under it came from the file
            elif not isinstance(node[part], Mapping):
                raise ConfigError(f"cannot set {'.'.join(parts)!r} from --opts: {sub!r} is "
                                  f'{_plain(node[part])!r}, not a mapping')
            node = node[part]
        node[parts[-1]] = value
        origins.mark('.'.join(parts), '--opts')


def _sync(node: CommentedMap, values: Mapping) -> List[str]:
    """Write resolved ``values`` into ``node`` where absent or changed (defaults, resolved values).

    Unchanged values are left alone so their formatting (`1e-5`, `min_lr: 0`) and comments stay.
    Returns the names that were added.
    """
    added = []
    for name, value in values.items():
        if name not in node:
            node[name] = _to_yaml(value)
            added.append(name)
        elif isinstance(value, Mapping) and isinstance(node[name], CommentedMap):
            _sync(node[name], value)
        elif _plain(node[name]) != value:
            node[name] = _to_yaml(value)
    return added


# ----------------------------------------------------------------------------- public API

def validate(schema: type, data: Mapping, origins: Optional[_Origins] = None,
             unused_keys: Iterable[str] = ()) -> Any:
    """``data`` (plain mapping) -> ``schema`` instance, or a one-line ConfigError."""
    try:
        return schema.model_validate(_plain(data), context={'unused': frozenset(unused_keys)})
    except ValidationError as exc:
        raise _config_error(schema, exc, origins or _Origins('(config)')) from None


def load_config(path: Union[str, Path, None], schema: type, opts: Optional[List[str]] = None,
                defaults_from: Union[str, Path, Mapping, BaseModel, None] = None,
                unused_keys: Iterable[str] = ()) -> tuple[Any, CommentedMap]:
    """Load, override and validate a config.

    Args:
        path: YAML file, or None for the schema defaults only.
        schema: the config model to build (e.g. ``RetrievalConfig``).
        opts: ``key=value`` overrides (dotted keys for nesting, YAML-typed values).
        defaults_from: optional lower-priority layer under the file: another YAML file, a mapping
            or a config instance (e.g. the config stored in a checkpoint).
        unused_keys: settings this run does not use: not checked against the rest of the config.
    Returns:
        (instance of `schema`, ruamel document of the resolved config incl. filled-in defaults).
    Raises:
        ConfigError: unknown key, wrong type, missing required key, invalid value.
    """
    label = str(path) if path is not None else '(no config file)'
    if path is not None and not Path(path).is_file():
        raise ConfigError(f'config file not found: {path}')
    doc = _read(Path(path), label) if path is not None else CommentedMap()
    origins = _Origins(label)
    if defaults_from is not None:
        if isinstance(defaults_from, (str, Path)):
            base, base_label = _read(Path(defaults_from), str(defaults_from)), str(defaults_from)
        else:
            base, base_label = _plain(defaults_from), 'defaults_from'
        _fill_under(doc, base, '', origins, base_label)
    _apply_opts(doc, list(opts or []), origins)
    cfg = validate(schema, doc, origins, unused_keys)
    added = _sync(doc, config_to_dict(cfg))
    if path is not None and added and len(added) < len(doc):
        doc.yaml_set_comment_before_after_key(added[0], before='schema defaults (not set in the file)')
    logger.info('loaded %s config from %s%s', schema.__name__, label,
                f" with overrides {' '.join(opts)}" if opts else '')
    return cfg, doc


# Keys that decide a model's shape: listed first when two configs are compared for a checkpoint.
ARCHITECTURE_KEYS = ('vit', 'image_size', 'med_config', 'tokenizer', 'embed_dim', 'queue_size', 'use_adapter',
                     'adapter_taps', 'adapter_reduction', 'text_adapter_reduction', 'decoder_depth', 'decoder_heads',
                     'decoder_mlp_ratio', 'stage', 'context_layers', 'context_heads', 'context_mlp_ratio',
                     'teacher_vit', 'teacher_med_config')


def config_diff(old: Mapping, new: Mapping, skip: Iterable[str] = ('output_dir',)) -> List[tuple]:
    """``[(dotted key, old value, new value)]`` where two config dicts differ (a key only one has
    counts, with None for the other), architecture keys first, then in ``new``'s order."""
    def flat(d, prefix=''):
        out = {}
        for k, v in (d or {}).items():
            key = f'{prefix}{k}'
            if isinstance(v, Mapping) and v:
                out.update(flat(v, key + '.'))
            else:
                out[key] = v
        return out
    a, b = flat(_plain(old)), flat(_plain(new))
    skip = set(skip)
    keys = [k for k in dict.fromkeys(list(b) + list(a)) if k.split('.')[0] not in skip and a.get(k) != b.get(k)]
    keys.sort(key=lambda k: k.split('.')[0] not in ARCHITECTURE_KEYS)  # stable: the order within each group stays
    return [(k, a.get(k), b.get(k)) for k in keys]


def describe_diff(diff: List[tuple], limit: int = 4) -> str:
    """``vit.width 64 -> 32, embed_dim 32 -> 16`` (the checkpoint's value first)."""
    text = ', '.join(f'{k} {a!r} -> {b!r}' for k, a, b in diff[:limit])
    return text + (f' (and {len(diff) - limit} more)' if len(diff) > limit else '')


def config_to_dict(instance: BaseModel) -> Dict[str, Any]:
    """A config instance as plain nested dicts/lists (for checkpoints and loggers)."""
    return _plain(instance)


def config_text(doc_or_instance: Any) -> str:
    """The resolved config as YAML text; a ruamel document keeps the original file's comments."""
    import io

    if isinstance(doc_or_instance, BaseModel):
        data = _to_yaml(doc_or_instance)
    elif isinstance(doc_or_instance, Mapping):
        data = doc_or_instance
    else:
        raise TypeError(f'expected a config document or model, got {type(doc_or_instance).__name__}')
    buf = io.StringIO()
    _yaml().dump(data, buf)
    return buf.getvalue()


def save_config(doc_or_instance: Any, path: Union[str, Path]) -> Path:
    """Write the resolved config as YAML (:func:`config_text`), atomically: never half a config."""
    from utils.atomic import atomic_write
    path = Path(path)
    text = config_text(doc_or_instance)
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))
    logger.info('wrote config to %s', path)
    return path


def parse_config(schema: type, argv: Optional[List[str]] = None, description: Optional[str] = None,
                 extra_args: Optional[Callable[[argparse.ArgumentParser], Any]] = None,
                 default_config: Optional[str] = None, prog: Optional[str] = None,
                 unused_keys: Optional[Callable[[argparse.Namespace], Iterable[str]]] = None
                 ) -> tuple[argparse.Namespace, Any, CommentedMap]:
    """Parse the command line of an entry script: ``(args, cfg, doc)``.

    ``prog`` names the command in usage lines (e.g. ``python -m tools score``); ``unused_keys(args)``
    names the settings the run will not use (e.g. gradient checkpointing under ``--evaluate``).
    Every command also gets the run flags ``--overwrite`` (read by ``utils.rundir.start_run``) and
    ``--debug`` (full tracebacks on the console, see ``utils.rundir.run_entry``).
    A bad config exits through ``parser.error`` (usage + message, status 2) rather than a traceback.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    group = parser.add_argument_group('config')
    group.add_argument('--config', metavar='FILE', default=default_config,
                       required=default_config is None, help='YAML config file')
    group.add_argument('--output_dir', metavar='DIR', default=None, help="overrides the config's output_dir")
    group.add_argument('--opts', nargs='*', action='extend', default=[], metavar='KEY=VALUE',
                       help='config overrides, e.g. --opts k_test=32 vit.width=96 pretrained= '
                            '(may be given several times; later entries win)')
    run = parser.add_argument_group('run')
    run.add_argument('--overwrite', action='store_true',
                     help="replace what a previous run left in output_dir: a training run's checkpoints, log.txt "
                          "and events (deleted once the new run has passed its checks), a tool's outputs; "
                          'without it such a run is refused')
    run.add_argument('--debug', action='store_true',
                     help='on an error, print the full traceback (it always goes to output_dir/run.log)')
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    set_debug(args.debug)
    try:
        cfg, doc = load_config(args.config, schema, args.opts,
                               unused_keys=unused_keys(args) if unused_keys else ())
    except ConfigError as err:
        parser.error(str(err))
    if args.output_dir is not None and 'output_dir' in schema.model_fields:
        cfg.output_dir = doc['output_dir'] = args.output_dir
    return args, cfg, doc
