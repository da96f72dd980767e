"""`patch` / `unpatch`: give a pretrained transformers model another positional encoding, or just our kernel.

How it works (and why it survives save/load):

- The patch lives in the config. Each patched rope group (the whole model, or one layer type of Gemma 3/4)
  gets `rope_parameters = {..the model's own entries.., "rope_type": POSENC_ROPE_TYPE, "posenc": {"encoding": "hope",
  "kwargs": {"context_length": 2048}, "kernel": true, "layers": null, "base_rope_type": "llama3"}}`.
  The model's own entries stay, so the original is `base_rope_type` plus everything but the "posenc" key.
- The rope type's name says what a checkpoint needs: "posenc (pip install posenc and `import posenc` before
  from_pretrained)". transformers cannot know posenc's type without it, and the only thing its error (a
  KeyError from the rotary module, after a warning about the missing validation) shows of the config is the
  rope type; tools that read config.json show it too. Checkpoints saved with the earlier name "posenc" load.
- `import posenc` registers the rope type in transformers' `ROPE_INIT_FUNCTIONS`. Its init
  function computes the model's own (possibly scaled) frequencies with transformers' function for
  `base_rope_type` and applies the encoding's mask (`Encoding.mask`: frequency 0 for pairs that don't
  rotate). transformers calls it whenever it builds or re-initialises rotary buffers (init, from_pretrained),
  so the masked frequencies are never lost; the attention scaling of the base type is kept.
- The kernel: on first use of a family, its attention class's `forward` is wrapped and its module-level
  `apply_rotary_pos_emb` replaced by a dispatcher. The wrapped forward reads *its own module's* config: for an
  unpatched layer it calls the original forward and the dispatcher the original function (bit-identical);
  for a patched layer the dispatcher rotates with `posenc.apply_rotary` on the same cos/sin tables
  (transformers' own, so `encoding="rope"` keeps the model's numbers to float32 rounding). Other models in
  the process are untouched: the decision is per attention module, from its config.
- Each patched attention module's `_Spec` (what the dispatcher does there) is worked out eagerly, where the
  patch appears: by `patch` for the modules of the model it patches, and in the attention class's `__init__`
  for a model built from a patched config (from_pretrained; `import posenc` installs the family when the
  config is validated, before any module is built). torch.compile then traces a cached lookup only: working a
  spec out builds an Encoding module, which Dynamo cannot trace. A spec still missing under torch.compile
  (a config changed by hand) is worked out outside the graph (one graph break, then a recompile without).
- `layers=` a subset of a rope group (e.g. some layer indices of Llama, whose layers share one rotary module):
  the rotary module keeps the model's frequencies and the dispatcher masks the tables of the chosen layers
  (cos = attention scale, sin = 0 for frozen pairs: exactly what frequency 0 gives).
"""
from __future__ import annotations

import copy
import functools
import gc
import threading
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..encodings import ENCODINGS, encoding_class, get_encoding, op_pairs_of, rotated_pairs_of
from ..frequencies import LENGTH_DEPENDENT_TYPES
from ..ops import _fast_rotary, apply_rotary
from .families import FAMILIES, SUPPORTED, Family, family_of

__all__ = ["patch", "unpatch", "is_patched", "current_patch", "register", "posenc_rope_init", "POSENC_ROPE_TYPE"]

POSENC_ROPE_TYPE = "posenc (pip install posenc and `import posenc` before from_pretrained)"
_ROPE_TYPES = (POSENC_ROPE_TYPE, "posenc")  # the name, and the one checkpoints saved before it carry
# Rope types whose frequencies change with the sequence length inside forward are not supported as a base.
_UNSUPPORTED_BASE = LENGTH_DEPENDENT_TYPES


# ------------------------------------------------------------------------------------------ config helpers
def _group_keys(config, rope_parameters) -> list:
    """[None] for one rope for all layers, else the layer types that rope_parameters is nested under."""
    labels = getattr(config, "_rope_type_labels", None) or getattr(config, "layer_types", None) or ()
    keys = [k for k in rope_parameters if k in set(labels)]
    return keys or [None]


def _params(rope_parameters, key):
    return rope_parameters if key is None else rope_parameters[key]


def _original_params(params: dict) -> dict:
    """The model's own rope parameters of one group (the patched dict minus the posenc entry)."""
    if params is None or params.get("rope_type") not in _ROPE_TYPES:
        return params
    original = {k: v for k, v in params.items() if k != "posenc"}
    original["rope_type"] = params["posenc"]["base_rope_type"]
    return original


def _original_rope_parameters(config) -> dict:
    rp = config.rope_parameters
    keys = _group_keys(config, rp)
    if keys == [None]:
        return _original_params(rp)
    return {k: (_original_params(v) if k in keys else v) for k, v in rp.items()}


def _layer_config(config, key):
    """The config transformers hands the rope init function for a layer type (Gemma 4: per-layer head_dim)."""
    if key is None or not hasattr(type(config), "per_layer_config"):
        return config
    try:
        return config.per_layer_config[key]
    except (ValueError, KeyError, TypeError, IndexError):
        return config


def _default_frequencies(config, params, family: Family | None, key, device):
    if family is not None:
        rotary_cls = getattr(family.load(), family.rotary)
        kwargs = {"layer_type": key} if key is not None else {}
        if device is not None:
            kwargs["device"] = device
        return rotary_cls.compute_default_rope_parameters(config, **kwargs)
    # A model we don't know: the standard formula, as transformers writes it.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv.to(device), 1.0


def _base_frequencies(config, key, params, device=None):
    """(inv_freq, attention_scaling) of the model's own rope for this group, computed by transformers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = _original_params(params)
    view = copy.copy(config)  # the same config with the original rope parameters for this group
    view.rope_parameters = original if key is None else {**config.rope_parameters, key: original}
    base = original.get("rope_type", "default")
    if base == "default":
        return _default_frequencies(view, original, family_of(config), key, device)
    if base not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"posenc: unknown base rope type {base!r}")
    kwargs = {"layer_type": key} if key is not None else {}
    if device is not None:
        kwargs["device"] = device
    return ROPE_INIT_FUNCTIONS[base](view, **kwargs)


def _masked(entry: dict, inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """The encoding's mask on the model's own frequencies (frequency 0 where a pair stops rotating)."""
    with torch.device("cpu"):  # transformers may be building the model on the meta device
        enc = get_encoding(entry["encoding"], head_dim=2 * inv_freq.numel(),
                           base=float(params.get("rope_theta", 1e4)), **entry.get("kwargs", {}))
    return enc.mask(inv_freq)


def posenc_rope_init(config, device=None, seq_len=None, layer_type=None, **kwargs):
    """transformers rope init function for posenc's rope type (registered in ROPE_INIT_FUNCTIONS):
    the model's own frequencies, masked by the encoding unless the patch is per layer (then masked in the
    attention of the chosen layers). Returns (inv_freq float32 [pairs], attention_scaling)."""
    params = _params(config.rope_parameters, layer_type)
    entry = params["posenc"]
    inv, scale = _base_frequencies(config, layer_type, params, device)
    if entry.get("layers") is None:
        inv = _masked(entry, inv, params)
    _install(family_of(config))  # a model being built from a patched config gets the kernel dispatch
    return inv, scale


def _validate_posenc_rope_parameters(self, rope_parameters, ignore_keys=None):
    """transformers config validation for posenc's rope type: the entry, then the base type's own rules."""
    entry = rope_parameters.get("posenc")
    if (not isinstance(entry, dict) or entry.get("encoding") not in ENCODINGS
            or not isinstance(entry.get("base_rope_type"), str) or not isinstance(entry.get("kernel"), bool)):
        raise ValueError("rope_type 'posenc' needs a 'posenc' entry with 'encoding' (one of "
                         f"{sorted(ENCODINGS)}), 'kernel' (bool) and 'base_rope_type'; got {entry!r}")
    original = _original_params(rope_parameters)
    validate = getattr(self, f"_validate_{original['rope_type']}_rope_parameters", None)
    if validate is not None:
        validate(original, ignore_keys=ignore_keys)
    _install(family_of(self))  # before a model is built from this config: its attention works out its spec


def register(rope_utils=None) -> None:
    """Register posenc's rope type with transformers (`import posenc` does this when transformers loads)."""
    if rope_utils is None:
        import transformers.modeling_rope_utils as rope_utils
    for name in _ROPE_TYPES:  # transformers looks the validation up as `_validate_{rope_type}_rope_parameters`
        rope_utils.ROPE_INIT_FUNCTIONS[name] = posenc_rope_init
        setattr(rope_utils.RotaryEmbeddingConfigMixin, f"_validate_{name}_rope_parameters",
                _validate_posenc_rope_parameters)


# ---------------------------------------------------------------------------------------- kernel dispatch
@dataclass(frozen=True)
class _Spec:
    """What the dispatcher does in one patched attention layer."""
    kernel: bool                # rotate with posenc.apply_rotary (else transformers' function)
    keep: torch.Tensor | None   # bool [pairs]: pairs that rotate, when the tables still hold all of them
    scale: float                # the rope type's attention scaling (cos/sin of a frozen pair: scale, 0)
    rotated_pairs: int          # pairs the kernel must visit (encodings.op_pairs_of)


_STATE = threading.local()
_INSTALL_LOCK = threading.Lock()
_INSTALLED: set = set()


def _layer_spec(attn) -> _Spec | None:
    """The spec for this attention module, from its own config (None: run transformers' code unchanged).
    Cached on the module, keyed by the patch's entry; resolve_specs / the wrapped __init__ fill the cache
    before torch.compile can see the module."""
    config = getattr(attn, "config", None)
    rp = getattr(config, "rope_parameters", None)
    if not rp:
        return None
    key, params = None, rp
    if "rope_type" not in rp:  # nested per layer type
        types, idx = getattr(config, "layer_types", None), getattr(attn, "layer_idx", None)
        if types is None or idx is None:
            return None
        key = types[idx]
        params = rp.get(key)
    if not params or params.get("rope_type") not in _ROPE_TYPES:
        return None
    entry = params["posenc"]
    cached = attn.__dict__.get("_posenc_spec")
    if cached is not None and cached[0] is entry:  # the entry object identifies one patch
        return cached[1]
    if torch.compiler.is_compiling():
        return _cache_spec_outside_the_graph(attn, config, key, params)
    return _cache_spec(attn, config, key, params)


def _cache_spec(attn, config, key, params) -> _Spec | None:
    with torch.device("cpu"):  # transformers may be building the model on the meta device
        spec = _compute_spec(config, key, params, getattr(attn, "layer_idx", None))
    attn.__dict__["_posenc_spec"] = (params["posenc"], spec)
    return spec


_cache_spec_outside_the_graph = torch.compiler.disable(_cache_spec)


def _resolve_specs(model: nn.Module, family: Family) -> None:
    """Work out the spec of every attention module of the family in `model` now (eagerly), so that the first
    call, compiled or not, only reads it."""
    attention = getattr(family.load(), family.attention)
    for module in model.modules():
        if isinstance(module, attention):
            _layer_spec(module)


def _compute_spec(config, key, params, layer_idx) -> _Spec | None:
    entry = params["posenc"]
    layers = entry.get("layers")
    if layers is not None and layer_idx not in layers:
        return None
    base, scale = _base_frequencies(_layer_config(config, key), key, params)
    masked = _masked(entry, base, params)
    keep = None
    if layers is not None and not torch.equal(masked, base):
        keep = masked != 0
    if not entry["kernel"] and keep is None:
        return None
    visit = op_pairs_of(rotated_pairs_of(masked), masked.numel(), float(scale))
    return _Spec(entry["kernel"], keep, float(scale), visit)


def _rotate(spec: _Spec, original, pair: bool, args, kwargs):
    names = ("q", "k", "cos", "sin", "unsqueeze_dim") if pair else ("x", "cos", "sin", "unsqueeze_dim")
    if not kwargs and len(args) == len(names) - 1:  # transformers' own call, (q, k, cos, sin) or (x, cos, sin):
        tensors, unsqueeze_dim = list(args), 1       # no binding (every layer and token pays this function)
    else:
        bound = dict(zip(names, args), **kwargs)
        unsqueeze_dim = bound.get("unsqueeze_dim", 1)
        tensors = [bound[n] for n in names[:-1]]
    cos, sin = tensors[-2], tensors[-1]
    if spec.keep is not None:
        if cos.shape[-1] != 2 * spec.keep.numel():
            raise ValueError(f"posenc: cos/sin tables have {cos.shape[-1]} channels, expected {2 * spec.keep.numel()}")
        keep = torch.cat([spec.keep, spec.keep]).to(cos.device)
        frozen = torch.tensor(spec.scale, dtype=torch.float32).to(device=cos.device, dtype=cos.dtype)
        cos, sin = torch.where(keep, cos, frozen), torch.where(keep, sin, torch.zeros_like(frozen))
    x = tensors[0]
    usable = (spec.kernel and unsqueeze_dim in (1, 2) and cos.dim() == 3 and x.dim() == 4
              and cos.shape[-1] == x.shape[-1] and (not pair or tensors[1].dtype == x.dtype))
    if not usable:
        return original(*tensors[:-2], cos, sin, unsqueeze_dim=unsqueeze_dim)
    layout = "bhsd" if unsqueeze_dim == 1 else "bshd"
    if pair:
        k = tensors[1]
    else:  # one tensor a call (Gemma 4): a zero-head partner
        k = x[:, :0] if layout == "bhsd" else x[:, :, :0]
    # the op's short path first (host time: eager decoding is bound by it), apply_rotary where it declines
    out = _fast_rotary(x, k, cos, sin, None, None, 1.0, None, spec.rotated_pairs, False, layout, False)
    q_out, k_out = out if out is not None else apply_rotary(x, k, cos, sin, rotated_pairs=spec.rotated_pairs,
                                                            layout=layout)
    return (q_out, k_out) if pair else q_out


def _make_dispatch(original, pair: bool):
    @functools.wraps(original)
    def apply_rotary_pos_emb(*args, **kwargs):
        spec = getattr(_STATE, "spec", None)
        if spec is None:
            return original(*args, **kwargs)
        return _rotate(spec, original, pair, args, kwargs)

    apply_rotary_pos_emb._posenc_original = original
    return apply_rotary_pos_emb


def _wrap_forward(forward):
    @functools.wraps(forward)
    def patched_forward(self, *args, **kwargs):
        spec = _layer_spec(self)
        if spec is None:
            return forward(self, *args, **kwargs)
        previous = getattr(_STATE, "spec", None)
        _STATE.spec = spec
        try:
            return forward(self, *args, **kwargs)
        finally:
            _STATE.spec = previous

    patched_forward._posenc_original = forward
    return patched_forward


def _wrap_init(init):
    @functools.wraps(init)
    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _layer_spec(self)  # a model built from a patched config: its spec, before any call

    patched_init._posenc_original = init
    return patched_init


def _install(family: Family | None) -> None:
    """Once per family and process: the dispatcher (inert for every module whose config is not patched)."""
    if family is None or family in _INSTALLED:
        return
    with _INSTALL_LOCK:
        if family in _INSTALLED:
            return
        module = family.load()
        if not hasattr(module.apply_rotary_pos_emb, "_posenc_original"):
            module.apply_rotary_pos_emb = _make_dispatch(module.apply_rotary_pos_emb, family.pair)
        attention = getattr(module, family.attention)
        if not hasattr(attention.forward, "_posenc_original"):
            attention.forward = _wrap_forward(attention.forward)
        if not hasattr(attention.__init__, "_posenc_original"):
            attention.__init__ = _wrap_init(attention.__init__)
        _INSTALLED.add(family)


def _rebind_captured_forwards(model, family: Family) -> None:
    """Hooks that saved an attention module's bound forward before the family was installed (accelerate's
    `_old_forward`, for models dispatched over devices) would bypass the wrapper: point them at it."""
    attention = getattr(family.load(), family.attention)
    original = attention.forward._posenc_original
    for module in model.modules():
        if not isinstance(module, attention):
            continue
        for name in ("_old_forward", "forward"):
            bound = module.__dict__.get(name)
            if getattr(bound, "__func__", None) is original:
                setattr(module, name, types.MethodType(attention.forward, module))


# ------------------------------------------------------------------------------------------ the public API
def _targets(model, strict: bool = True) -> list[tuple[Family, object, list]]:
    """[(family, text config, its rotary modules)] found in the model (a PreTrainedModel, PeftModel, ...);
    none found: a ValueError listing the supported families if strict, else []."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (torch.nn.Module), got {type(model).__name__}")
    by_class = {(f.module, f.rotary): f for f in FAMILIES.values()}
    found: dict[int, tuple] = {}
    for module in model.modules():
        family = by_class.get((type(module).__module__, type(module).__name__))
        config = getattr(module, "config", None)
        if family is None or config is None:
            continue
        found.setdefault(id(config), (family, config, []))[2].append(module)
    if not found and strict:
        config = getattr(model, "config", None)
        raise ValueError(f"posenc.patch supports these model families: {SUPPORTED}; got {type(model).__name__} "
                         f"(model_type {getattr(config, 'model_type', None)!r})")
    return list(found.values())


def _select_layers(config, layers) -> set[int]:
    n = config.num_hidden_layers
    if layers is None:
        return set(range(n))
    types = getattr(config, "layer_types", None)
    if isinstance(layers, str):
        if not types or layers not in types:
            have = f"its layer types are {sorted(set(types))}" if types else "it has no layer types (give indices)"
            raise ValueError(f"layers={layers!r} is not a layer type of this model; {have}")
        return {i for i, t in enumerate(types) if t == layers}
    try:
        items = list(layers)
    except TypeError:
        raise TypeError(f"layers must be None, a layer type name or layer indices, got {type(layers).__name__}") from None
    if not items:
        raise ValueError("layers must select at least one layer, got an empty list")
    chosen = set()
    for i in items:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"layers must hold integer layer indices, got {i!r}")
        if not -n <= i < n:
            raise ValueError(f"layers: index {i} is out of range for a model with {n} layers")
        chosen.add(i % n)
    return chosen


def _check_kv_sharing(config, selected: set[int], layers) -> None:
    """Gemma 4's last `num_kv_shared_layers` layers reuse the (rotated) keys of the last earlier layer of their
    type: a patch must take such a group whole, or queries and keys would use different encodings."""
    shared = getattr(config, "num_kv_shared_layers", 0) or 0
    types = getattr(config, "layer_types", None)
    if not shared or not types:
        return
    first = config.num_hidden_layers - shared
    for layer_type in set(types[first:]):
        source = max(i for i in range(first) if types[i] == layer_type)
        tied = [source] + [i for i in range(first, config.num_hidden_layers) if types[i] == layer_type]
        if 0 < len(selected.intersection(tied)) < len(tied):
            raise ValueError(f"layers={layers!r} splits layers {tied}, which share keys and values "
                             "(num_kv_shared_layers); patch all of them or none")


def _default_context_length(config, params) -> int:
    """HoPE's L: the length the model was pretrained on (original_max_position_embeddings where scaled)."""
    for value in (params.get("original_max_position_embeddings"),
                  getattr(config, "original_max_position_embeddings", None),
                  getattr(config, "max_position_embeddings", None)):
        if value:
            return int(value)
    raise ValueError("the config has no max_position_embeddings; pass context_length=")


def _enclosing(model: nn.Module) -> tuple[list[nn.Module], set[int]]:
    """(the outermost modules that contain `model`, or [model]; ids of `model` and every module containing it).
    Modules do not link to their parents, so the parents are found among the live modules."""
    parents: dict[int, list] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), nn.Module):
            for child in (obj.__dict__.get("_modules") or {}).values():
                if child is not None:
                    parents.setdefault(id(child), []).append(obj)
    roots, chain, todo = [], set(), [model]
    while todo:
        module = todo.pop()
        if id(module) in chain:
            continue
        chain.add(id(module))
        todo.extend(parents.get(id(module), ()))
        if id(module) not in parents:
            roots.append(module)
    return roots or [model], chain


def _own_configs(model, changed: list) -> dict[int, object]:
    """Give the model private copies of the configs its modules hold, so that patching it cannot change another
    model built from the same config object. "The model" includes every module that contains `model`:
    patch(model.model) must change the config that model.save_pretrained writes (with a private copy for the
    inner modules only, it wrote the original rope). Off that line of ancestors, a module that holds one of the
    `changed` configs (or a config nesting one) belongs to another model and keeps its config.
    Returns {id(old config): new config}."""
    roots, chain = _enclosing(model)
    inside = {id(m) for m in model.modules()}
    changed_ids = {id(c) for c in changed}

    def another_models(module) -> bool:
        config = module.config
        holds = id(config) in changed_ids or any(id(v) in changed_ids for v in vars(config).values())
        return holds and id(module) not in chain and id(module) not in inside

    holders = {id(m): m for root in roots for m in root.modules() if hasattr(m.__dict__.get("config"), "to_dict")}
    holders = [m for m in holders.values() if not another_models(m)]
    memo: dict = {}
    copies = {id(m.config): copy.deepcopy(m.config, memo) for m in holders}  # one memo: nesting is kept
    for m in holders:
        m.config = copies[id(m.config)]
    return copies


def _refresh_rotary(rotary: nn.Module) -> None:
    """Rebuild a rotary module's buffers and attributes from its config, exactly as transformers builds them
    (keeping the device and dtype the model has), so the live model equals a freshly loaded one."""
    fresh = type(rotary)(rotary.config)
    for name in list(rotary._buffers):
        if name not in fresh._buffers:
            del rotary._buffers[name]
    for name, buf in fresh._buffers.items():
        old = rotary._buffers.get(name)
        if old is not None and old.device.type != "meta":
            buf = buf.to(device=old.device, dtype=old.dtype)
        rotary._buffers[name] = buf
    rotary._non_persistent_buffers_set |= fresh._non_persistent_buffers_set
    for name in [n for n in vars(rotary) if n.endswith("long_inv_freq")]:
        delattr(rotary, name)  # cached by transformers' dynamic/longrope update
    for name, value in vars(fresh).items():
        if not name.startswith("_") and name != "training":
            rotary.__dict__[name] = value


def _check_encoding(encoding, kernel, encoding_kwargs) -> str:
    if not isinstance(encoding, str):
        raise TypeError(f"encoding must be a string such as 'hope', got {type(encoding).__name__}")
    if not isinstance(kernel, bool):
        raise TypeError(f"kernel must be True or False, got {kernel!r}")
    cls = encoding_class(encoding)  # resolves aliases ("p-rope"), raises on unknown names
    extra = sorted(set(encoding_kwargs) - set(cls.options))
    if extra:
        takes = ", ".join(cls.options) or "no arguments"
        raise TypeError(f"patch(encoding={cls.name!r}) takes {takes}; got unexpected {extra} (head_dim, base and "
                        "the rope scaling come from the model's config)")
    return cls.name


def patch(model, encoding: str = "hope", layers=None, kernel: bool = True, **encoding_kwargs):
    """Give a transformers model (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3/Gemma4 text) another
    positional encoding, in place; returns the model. `model` may also be a module inside one (model.model,
    a PEFT wrapper's base model): the patch goes into the config the whole model shares, so the outer model
    saves it. Other models, even ones built from the same config object, are not changed.

    encoding: "rope" (keep the model's frequencies; with kernel=True only the fused op changes), "hope"
      (context_length=, default the config's original max position embeddings), "prope"/"p-rope" (p=), "nope".
      The encoding masks the model's own frequencies, scaled ones included (llama3, yarn, linear, ...).
    layers: None (all layers), a layer type ("full_attention", "sliding_attention") or layer indices.
    kernel: rotate q and k with posenc's fused op (same cos/sin tables as transformers) in patched layers.
    The patch is stored in `config.rope_parameters` (rope_type POSENC_ROPE_TYPE), so save_pretrained and then
    from_pretrained (after `import posenc`) give the patched model back. Patching again replaces the patch;
    `unpatch` restores the original config and numbers.
    """
    name = _check_encoding(encoding, kernel, encoding_kwargs)
    register()
    plans = [(family, config, rotaries, _patched_parameters(config, layers, name, kernel, encoding_kwargs))
             for family, config, rotaries in _targets(model)]
    private = _own_configs(model, [config for _, config, _, _ in plans])  # every check passed: now change it
    for family, config, rotaries, new in plans:
        config = private[id(config)]
        _install(family)
        _rebind_captured_forwards(model, family)
        config.rope_parameters = new
        for rotary in rotaries:
            _refresh_rotary(rotary)
        _resolve_specs(model, family)
    return model


def _patched_parameters(config, layers, name, kernel, encoding_kwargs) -> dict:
    """The patched `rope_parameters` for this config (computed and checked without changing anything)."""
    selected = _select_layers(config, layers)
    _check_kv_sharing(config, selected, layers)
    original = _original_rope_parameters(config)  # patching again replaces the earlier patch
    if not original:
        raise ValueError("the model has no rope parameters to patch")
    new = copy.deepcopy(original)
    types = getattr(config, "layer_types", None)
    patched_any = False
    for key in _group_keys(config, new):
        params = _params(new, key)
        if params is None:  # a layer type without rope
            continue
        group = [i for i in range(config.num_hidden_layers) if key is None or types[i] == key]
        chosen = [i for i in group if i in selected]
        if not chosen:
            continue
        base = params.get("rope_type", "default")
        if base in _UNSUPPORTED_BASE:
            raise ValueError(f"posenc.patch does not support rope_type {base!r} (its frequencies change with the "
                             "sequence length)")
        kwargs = dict(encoding_kwargs)
        if name == "hope" and "context_length" not in kwargs:
            kwargs["context_length"] = _default_context_length(config, params)
        params["posenc"] = {"encoding": name, "kwargs": kwargs, "kernel": kernel,
                            "layers": None if chosen == group else chosen, "base_rope_type": base}
        params["rope_type"] = POSENC_ROPE_TYPE
        # Compute the frequencies once: bad encoding arguments raise here, before the model changes.
        view = copy.copy(config)
        view.rope_parameters = new
        _masked(params["posenc"], _base_frequencies(_layer_config(view, key), key, params)[0], params)
        patched_any = True
    if not patched_any:
        raise ValueError(f"layers={layers!r} selects no layer with rotary embeddings")
    return new


def unpatch(model):
    """Undo `patch`: restore the original rope parameters and rotary buffers (bit-identical numbers).
    A model that is not patched (or of a family patch does not support) is returned unchanged."""
    for _, config, rotaries in _targets(model, strict=False):
        if _is_patched_config(config):
            config.rope_parameters = _original_rope_parameters(config)
            for rotary in rotaries:
                _refresh_rotary(rotary)
    return model


def _is_patched_config(config) -> bool:
    rp = config.rope_parameters or {}
    return any((_params(rp, key) or {}).get("rope_type") in _ROPE_TYPES for key in _group_keys(config, rp))


def is_patched(model) -> bool:
    """Whether any rope group of the model carries a posenc patch (False for a model patch does not support)."""
    return any(_is_patched_config(config) for _, config, _ in _targets(model, strict=False))


def current_patch(model) -> dict | None:
    """posenc.patch keyword arguments that reproduce the model's current patch (e.g. of a checkpoint saved
    patched), or None if it is not patched. Every patched state is one patch() call (patching again
    replaces), so one set of arguments always suffices."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rp = getattr(config, "rope_parameters", None) or {}
    types = getattr(config, "layer_types", None) or []
    groups = {None: rp} if "rope_type" in rp else {k: v for k, v in rp.items() if k in set(types)}
    # A patched group: rope_type "posenc ..." (the name has changed once; both start so) and a "posenc" entry.
    entries = [(k, p["posenc"]) for k, p in groups.items() if isinstance(p, dict)
               and str(p.get("rope_type", "")).startswith("posenc") and isinstance(p.get("posenc"), dict)]
    if not entries:
        return None
    n = config.num_hidden_layers
    layers: set[int] = set()
    for key, entry in entries:
        if entry.get("layers") is not None:
            layers |= set(entry["layers"])
        else:
            layers |= set(range(n)) if key is None else {i for i, t in enumerate(types) if t == key}
    entry = entries[0][1]
    return {"encoding": entry["encoding"], "kernel": entry["kernel"],
            "layers": None if layers == set(range(n)) else sorted(layers), **entry.get("kwargs", {})}
