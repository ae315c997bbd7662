"""The state a Flower strategy carries from round to round, described for the coordinator's
checkpoint (``fedllm.coordinator.checkpoint``) and put back on ``--resume``.

Read from the installed Flower 1.42 source: FedAdam/FedAdagrad/FedYogi (``FedOpt``): ``m_t``,
``v_t`` and ``current_arrays`` (the arrays sent last; ``configure_train`` overwrites it, it is
kept for exactness). There is no step counter: Adam's bias correction uses ``server_round``.
FedAvg and FedProx carry nothing. fedllm's central-DP wrappers (``SiteLevelFixedClipping``,
``SiteLevelAdaptiveClipping``): ``current_arrays``, ``num_sampled_clients``,
``round_clipping_norm``, ``round_sites`` and, adaptive only, ``clipping_norm`` (C moves every
round). The wrappers' noise is drawn after a fresh 256-bit reseed every round, so there is no
generator state to keep. Flower's privacy accountant (unused by fedllm) is refused.
Hyperparameters (``eta``, ``beta_1``, noise multiplier, ...) are saved too and must be equal when
restoring: the state only means something for the same maths.

The description is ``{"class": "SiteLevelFixedClipping(FedProx)", "layers": [...]}`` (one entry
per wrapper layer, outermost first: class, settings, scalars, array groups with their keys); the
tensors are named ``"<layer index>.<group>/<key>"``. This is the ``"strategy"`` object of
``RUN_DIR/state/server-state.json`` (format 1) and the keys of its strategy tensor file.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi

from fedllm.flower.strategies import SiteLevelAdaptiveClipping, SiteLevelFixedClipping

# Per strategy class (exact type): hyperparameters that must match, scalar state, array state.
_SPEC: dict[type, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    FedAvg: ((), (), ()),
    FedProx: (("proximal_mu",), (), ()),
    FedAdam: (("eta", "eta_l", "beta_1", "beta_2", "tau"), (), ("current_arrays", "m_t", "v_t")),
    FedAdagrad: (("eta", "eta_l", "beta_1", "beta_2", "tau"), (), ("current_arrays", "m_t", "v_t")),
    FedYogi: (("eta", "eta_l", "beta_1", "beta_2", "tau"), (), ("current_arrays", "m_t", "v_t")),
    SiteLevelFixedClipping: (("noise_multiplier", "clipping_norm"),
                             ("num_sampled_clients", "round_clipping_norm", "round_sites"), ("current_arrays",)),
    SiteLevelAdaptiveClipping: (("noise_multiplier", "clipped_count_stddev", "target_clipped_quantile", "clip_norm_lr"),
                                ("clipping_norm", "num_sampled_clients", "round_clipping_norm", "round_sites"),
                                ("current_arrays",)),
}
_WRAPPERS = (SiteLevelFixedClipping, SiteLevelAdaptiveClipping)


def layers_of(strategy: Any) -> list[Any]:
    """The strategy and the strategies it wraps, outermost first."""
    layers = [strategy]
    while isinstance(layers[-1], _WRAPPERS):
        layers.append(layers[-1].strategy)
    return layers


def class_label(strategy: Any) -> str:
    """``"FedAdam"``, ``"SiteLevelFixedClipping(FedProx)"``."""
    names = [type(layer).__name__ for layer in layers_of(strategy)]
    return "".join(f"{n}(" for n in names[:-1]) + names[-1] + ")" * (len(names) - 1)


def describe_strategy(strategy: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON description, the tensors under unique names); ``ValueError`` for a strategy whose
    state this module does not know."""
    layers, tensors = [], {}
    for index, layer in enumerate(layers_of(strategy)):
        spec = _SPEC.get(type(layer))
        if spec is None:
            raise ValueError(f"cannot save the state of a {type(layer).__name__} strategy (known: "
                             f"{', '.join(sorted(t.__name__ for t in _SPEC))})")
        if getattr(layer, "accountant", None) is not None or getattr(layer, "_pending_events", None):
            raise ValueError("cannot save the state of Flower's privacy accountant (fedllm does not use it)")
        settings_names, scalar_names, array_names = spec
        groups: dict[str, dict] = {}
        for group in array_names:
            value = getattr(layer, group)
            if value is None:
                groups[group] = {"kind": "none", "keys": []}
                continue
            kind = "arrayrecord" if isinstance(value, ArrayRecord) else "ndarrays"
            keys = list(value.keys())
            for key in keys:
                tensors[f"{index}.{group}/{key}"] = value[key].numpy() if kind == "arrayrecord" else np.asarray(value[key])
            groups[group] = {"kind": kind, "keys": keys}
        layers.append({
            "class": type(layer).__name__,
            "settings": {name: _scalar(getattr(layer, name)) for name in settings_names},
            "scalars": {name: _scalar(getattr(layer, name)) for name in scalar_names},
            "arrays": groups,
        })
    return {"class": class_label(strategy), "layers": layers}, tensors


def _scalar(value: Any) -> int | float:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"unexpected bool strategy attribute {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot save a non-finite strategy attribute ({value})")
    return value


def restore_flower_strategy(strategy: Any, description: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Put a :func:`describe_strategy` state into ``strategy``, freshly built from the run's
    configuration (``build_strategy``, then ``with_central_dp`` when enabled). ``ValueError``
    (ending in what to do) unless it is of the same classes with the same hyperparameters and the
    tensors are all there."""
    try:
        saved = description["layers"]
        layers = layers_of(strategy)
        if [type(layer).__name__ for layer in layers] != [entry["class"] for entry in saved]:
            raise ValueError(f"the state was saved by a {description['class']} strategy, this run builds "
                             f"{class_label(strategy)}; cannot resume; resume with the run's own configuration "
                             "(strategy.name and central-dp.* as in RUN_DIR/config.toml)")
        for index, entry in enumerate(saved):
            for group, spec in entry["arrays"].items():
                missing = [k for k in spec["keys"] if f"{index}.{group}/{k}" not in tensors]
                if missing:
                    raise ValueError(f"the strategy file lacks {group} tensor {missing[0]!r}; cannot resume; restore "
                                     "the state from a backup, or start a new run (without --resume) into another "
                                     "output folder")
        for layer, entry in zip(layers, saved, strict=True):
            settings_names, _, _ = _SPEC[type(layer)]
            differ = [f"{name} {entry['settings'][name]!r} (now {_scalar(getattr(layer, name))!r})"
                      for name in settings_names if entry["settings"][name] != _scalar(getattr(layer, name))]
            if differ:
                raise ValueError(f"{entry['class']} was run with {'; '.join(differ)}; cannot resume; resume with the "
                                 "run's own configuration (RUN_DIR/config.toml)")
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"the saved strategy state is malformed ({exc.__class__.__name__}: {exc}); cannot resume; "
                         "restore the state from a backup, or start a new run (without --resume)") from None
    for index, (layer, entry) in enumerate(zip(layers, saved, strict=True)):
        for name, value in entry["scalars"].items():
            setattr(layer, name, value)
        for group, spec in entry["arrays"].items():
            values = {k: np.array(tensors[f"{index}.{group}/{k}"]) for k in spec["keys"]}
            if spec["kind"] == "none":
                setattr(layer, group, None)
            elif spec["kind"] == "arrayrecord":
                setattr(layer, group, ArrayRecord({k: Array(v) for k, v in values.items()}))
            else:
                setattr(layer, group, values)
