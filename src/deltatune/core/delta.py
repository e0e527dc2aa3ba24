"""Delta: one named delta: its layers (one per touched module), its tensors, and how it merges.

A method subclasses Delta, sets ``default_roles`` and ``supported_types``, and implements
``make_layer``; anything more unusual (model-level inputs, shared tensors) overrides ``build``.
Layers live in ``self.layers`` keyed by module path with "/" for "." (ModuleDict keys cannot hold
dots); ``delta_state_dict`` turns them back into ``<module path>.<tensor>`` keys.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError, MergeError, TargetError
from . import arch
from .config import DeltaConfig
from .layer import DeltaLayer, ParamCopy
from .targets import select

ROOT_KEY = "@"  # layer key of the model's root module


def path_to_key(path: str) -> str:
    return path.replace(".", "/") if path else ROOT_KEY


def key_to_path(key: str) -> str:
    return "" if key == ROOT_KEY else key.replace("/", ".")


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's direct parameters and buffers that a layer's merge may write, as plain tensors
    (a tensor subclass, e.g. packed 4-bit codes, is no weight a layer adds into: it refuses)."""
    both = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [(n, t) for n, t in both if type(t.detach()) is torch.Tensor]


class Delta(nn.Module):
    config_cls: ClassVar[type[DeltaConfig]]
    default_roles: ClassVar[tuple[str, ...]] = ()
    supported_types: ClassVar[tuple[type, ...]] = ()  # empty: any module type
    combiner: ClassVar[bool] = False  # True: only mixes other deltas' outputs (compose.Fuse)
    #: while merged: the base tensors an exact merge copied (per layer key), or the delta's own
    #: values at a non-exact merge (see ``merge``)
    _base_copy: dict[str, dict[str, torch.Tensor]] | None = None
    _at_merge: dict[str, torch.Tensor] | None = None

    def __init__(self, name: str, config: DeltaConfig, model: nn.Module):
        super().__init__()
        self.name = name
        self.config = config
        self.layers = nn.ModuleDict()
        #: layer key -> the module path it runs on, for layers that do not run on their own path
        self.sites: dict[str, str] = {}
        self.build(model)
        self.add_heads(model)
        if not len(self.layers):
            raise TargetError(f"delta {name!r} ({config.method}) touches no module of the model.")

    # -- building ---------------------------------------------------------------------------------
    def target_pattern(self, model: nn.Module) -> list[str] | str:
        if self.config.targets is not None:
            return self.config.targets
        return arch.role_patterns(model, self.default_roles, self.config.method)

    def targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules this delta attaches to, with a clear error for unsupported types."""
        cfg = self.config
        found = select(model, self.target_pattern(model), layers=cfg.layers, exclude=cfg.exclude,
                       method=cfg.method)
        saved = set(self.head_names(model))
        both = [n for n, _ in found if n.split(".", 1)[0] in saved]
        if both and cfg.targets is not None and cfg.modules_to_save is not None:
            raise TargetError(
                f"{both[0]} is both a target of {cfg.method!r} and inside modules_to_save entry "
                f"{both[0].split('.', 1)[0]!r} (trained whole): name it in only one of the two.")
        found = [(n, m) for n, m in found if n.split(".", 1)[0] not in saved]
        if not self.supported_types:
            return found
        ok = [(n, m) for n, m in found if isinstance(m, self.supported_types)]
        bad = [(n, m) for n, m in found
               if not isinstance(m, self.supported_types) and not any(True for _ in m.children())]
        # named suffixes that hit an unsupported leaf are a mistake; a regex or default may be broad
        if not ok or (bad and isinstance(cfg.targets, list)):
            raise self._type_error(bad or found)
        return ok

    def _type_error(self, bad: list[tuple[str, nn.Module]]) -> TargetError:
        kinds = ", ".join(t.__name__ for t in self.supported_types)
        listed = ", ".join(f"{n} ({type(m).__name__})" for n, m in bad[:5])
        return TargetError(
            f"method {self.config.method!r} supports {kinds} modules, but targets match {listed}. "
            f"Narrow `targets` to modules of a supported type."
        )

    def build(self, model: nn.Module) -> None:
        for path, module in self.targets(model):
            self.add_layer(path, self.make_layer(path, module))

    def make_layer(self, path: str, module: nn.Module) -> DeltaLayer:
        raise NotImplementedError

    def add_layer(self, path: str, layer: DeltaLayer, clash: str = "", site: str | None = None) -> None:
        """The delta's layer at module `path`; a second layer there is refused (`clash`: why it
        happened, in the method's words), never overwritten. `site`: the module it runs on when
        that is not `path` (a model-level layer that must run where every caller passes: the
        backbone, which trainers may call directly); its tensors keep `path`'s name."""
        key, site = path_to_key(path), path if site is None else site
        taken = next((k for k in self.layers if self.site(k) == site), None)
        if key in self.layers or taken is not None:
            other = self.layers[key if key in self.layers else taken]
            raise TargetError(clash or f"{self.config.method}: two layers on {site or '<model>'!r} "
                                       f"({type(other).__name__} and {type(layer).__name__}): "
                                       f"choose targets that name each module once.")
        self.layers[key] = layer
        if site != path:
            self.sites[key] = site

    def site(self, key: str) -> str:
        """The module path the layer `key` runs on."""
        return self.sites.get(key, key_to_path(key))

    def head_names(self, model: nn.Module) -> list[str]:
        """Modules trained fully and saved whole: the config's, or the model's fresh task head."""
        names = self.config.modules_to_save
        return arch.head_modules(model) if names is None else names

    def add_heads(self, model: nn.Module) -> None:
        for head in self.head_names(model):
            matches = select(model, [head], method=self.config.method)
            for hpath, hmod in matches:
                for sub, m in hmod.named_modules():
                    if any(True for _ in m.parameters(recurse=False)):
                        path = f"{hpath}.{sub}" if sub else hpath
                        if path_to_key(path) not in self.layers:
                            self.add_layer(path, ParamCopy(m))

    def paths(self) -> list[str]:
        return [key_to_path(k) for k in self.layers]

    # -- training-loop hooks (no-ops unless a method needs them) ---------------------------------
    @property
    def scheduled(self) -> bool:
        """Whether training this delta needs ``on_step`` each optimizer step (a method that
        overrides it: a budget schedule, a switch of tensors)."""
        return type(self).on_step is not Delta.on_step

    @property
    def regularized(self) -> bool:
        """Whether this delta adds a loss term (``regularization``) to training."""
        return type(self).regularization is not Delta.regularization

    def regularization(self) -> torch.Tensor | None:
        """An extra loss term (orthogonality, L0 penalty, ...); None when the method has none."""
        return None

    def on_step(self, step: int) -> None:
        """Called once per optimizer step by ``DeltaModel.step`` (budget schedules, ...)."""

    #: bumped when ``on_step`` replaces the trainable tensors (a sparse switch): a training loop
    #: that sees it change builds a new optimizer over ``DeltaModel.trainable_parameters()``
    param_version: int = 0

    def masked_count(self) -> int:
        """Entries of trainable tensors held at zero by a fixed mask: not counted as trainable."""
        return 0

    # -- optimizer groups -------------------------------------------------------------------------
    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers of some trainable parameters, by their ``named_parameters()``
        name (the others train at 1x). A method whose paper trains parts at different rates
        overrides it; ``optimizer_groups`` honours it."""
        return {}

    def head_parameter_ids(self, model: nn.Module) -> set[int]:
        """ids of the task-head copies' parameters (``modules_to_save``): trained at ``head_lr``."""
        heads = set(self.head_names(model))
        return {id(p) for k, layer in self.layers.items()
                if isinstance(layer, ParamCopy) and key_to_path(k).split(".")[0] in heads
                for p in layer.parameters()}

    def optimizer_groups(self, model: nn.Module, lr: float, head_lr: float | None = None) -> list[dict[str, Any]]:
        """This delta's trainable parameters as torch optimizer groups: ``lr`` times each one's
        ``lr_scales()`` multiplier, the task heads / ``modules_to_save`` copies at ``head_lr``
        (default: ``lr``). Every trainable parameter is in exactly one group; groups in first-seen
        order, none empty."""
        scales = self.lr_scales()
        named = dict(self.named_parameters())
        odd = sorted(set(scales) - {n for n, p in named.items() if p.requires_grad})
        if odd:
            raise ConfigError(f"{type(self).__name__}.lr_scales() names {odd[:3]}, which are not trainable "
                              f"parameters of delta {self.name!r} (a method bug: name them as "
                              f"named_parameters() does).")
        head_ids = self.head_parameter_ids(model)
        groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for n, p in named.items():
            if p.requires_grad:
                head = id(p) in head_ids
                groups.setdefault((head, 1.0 if head else float(scales.get(n, 1.0))), []).append(p)
        return [{"params": ps, "lr": (lr if head_lr is None else head_lr) if head else lr * scale}
                for (head, scale), ps in groups.items()]

    # -- weighted combination of several deltas of this method (DeltaModel.add_weighted) ---------
    @classmethod
    def weighted(cls, name: str, deltas: list[Delta], weights: list[float], model: nn.Module,
                 how: str = "linear", **options: Any) -> Delta:
        """A new delta equal to a weighted combination of `deltas`: by default task arithmetic on
        their dense weight updates (core/task_arith.py); methods with a combination of their own
        (LoRA's factors) override, methods whose deltas do not add up use ``no_weighted``."""
        from .task_arith import dense_weighted

        return dense_weighted(name, deltas, weights, model, how=how, **options)

    @classmethod
    def no_weighted(cls, name: str, deltas: list[Delta], weights: list[float], model: nn.Module,
                    how: str = "linear", **options: Any) -> Delta:
        """Refuses: for methods whose deltas' weight updates must not be added up."""
        method = deltas[0].config.method
        raise MergeError(f"method {method!r} has no weighted combination into one delta: combine "
                         f"LoRA deltas, or run {method!r} deltas together with "
                         f"activate(..., composition='average', weights=[...]).")

    # -- merging --------------------------------------------------------------------------------
    @property
    def mergeable(self) -> bool:
        return all(layer.mergeable for layer in self.layers.values())

    def merge(self, model: nn.Module, exact: bool = True) -> None:
        """Fold the delta into `model`'s weights. ``exact``: first copy each tensor of a module
        whose layer cannot restore it bit for bit itself (``exact_unmerge``), for ``unmerge``.
        Without: keep the delta's own values (small) instead, so that an optimizer step while
        merged cannot make ``unmerge`` subtract something other than what was added."""
        bad = [k for k, layer in self.layers.items() if not layer.mergeable]
        if bad:
            raise MergeError(
                f"delta {self.name!r} ({self.config.method}) cannot be merged: "
                f"{type(self.layers[bad[0]]).__name__} at {key_to_path(bad[0]) or '<model>'} has no "
                f"weight to fold into. Keep it unmerged (it still runs), or use a mergeable method."
            )
        self._check_untied(model)
        with torch.no_grad():
            self._base_copy = {} if exact else None
            self._at_merge = None if exact else {k: v.clone() for k, v in self.state_dict().items()}
            for key, layer in self.layers.items():
                module = model.get_submodule(key_to_path(key))
                if exact and not layer.exact_unmerge:
                    self._base_copy[key] = {n: t.detach().clone() for n, t in _own_tensors(module)}
                layer.merge(module)

    def _check_untied(self, model: nn.Module) -> None:
        """Merging into a tied weight (GPT-2's wte = lm_head) would change its twin too."""
        owners: dict[int, list[str]] = {}
        for path, module in model.named_modules():
            for n, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append(f"{path}.{n}" if path else n)
        for key in self.layers:
            path = key_to_path(key)
            module = model.get_submodule(path)
            for n, p in module.named_parameters(recurse=False):
                if len(owners.get(id(p), [])) > 1:
                    raise MergeError(
                        f"cannot merge delta {self.name!r}: {path}.{n} is tied to "
                        f"{', '.join(o for o in owners[id(p)] if o != f'{path}.{n}')}, which merging "
                        f"would change too. Keep it unmerged, or exclude that module from targets."
                    )

    @torch.no_grad()
    def unmerge(self, model: nn.Module) -> None:
        """Take the delta out of `model`'s weights: the copies kept by an exact merge are put back
        (bit for bit, whatever changed since); else each layer undoes what it added, computed from
        the delta's values at merge time (an optimizer step since does not leak into the base)."""
        copies = self._base_copy or {}
        with self._values_at_merge():
            for key, layer in reversed(list(self.layers.items())):
                module = model.get_submodule(key_to_path(key))
                layer.unmerge(module)  # also clears the layer's own merge state
                for n, old in copies.pop(key, {}).items():
                    getattr(module, n).copy_(old)
        self._base_copy = None

    @contextlib.contextmanager
    def _values_at_merge(self) -> Iterator[None]:
        """Inside: the delta's tensors as they were at a non-exact merge; after: as they are now."""
        then, self._at_merge = self._at_merge, None
        now = self.state_dict()  # shares storage with the parameters
        changed = {k: v.clone() for k, v in now.items()
                   if then is not None and k in then and not torch.equal(v, then[k])}
        for k in changed:
            now[k].copy_(then[k])
        try:
            yield
        finally:
            for k, v in changed.items():
                now[k].copy_(v)

    # -- state ------------------------------------------------------------------------------------
    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a save writes: ``<module path>.<tensor>`` keys (root tensors unprefixed)."""
        return {self._save_key(k): v for k, v in self.state_dict().items()}

    @staticmethod
    def _save_key(key: str) -> str:
        if not key.startswith("layers."):
            return key
        lkey, _, rest = key[len("layers."):].partition(".")
        path = key_to_path(lkey)
        return f"{path}.{rest}" if path else rest

    def load_delta_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {self._save_key(k): k for k in self.state_dict()}
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise CheckpointError(
                f"saved delta {self.name!r} does not fit this model: "
                + (f"missing tensors {missing[:5]}; " if missing else "")
                + (f"unexpected tensors {extra[:5]}; " if extra else "")
                + "load it into the base model (and config) it was trained on."
            )
        current = self.state_dict()
        for skey, key in own.items():
            if tuple(current[key].shape) != tuple(tensors[skey].shape):
                raise CheckpointError(
                    f"tensor {skey!r} of delta {self.name!r} has shape "
                    f"{tuple(tensors[skey].shape)} in the file but {tuple(current[key].shape)} on "
                    f"this model: the base model differs from the one it was trained on."
                )
        self.load_state_dict({key: tensors[skey] for skey, key in own.items()})

    def extra_state(self) -> dict[str, Any]:
        """JSON-serializable state saved beside the config (seeds, schedules...)."""
        return {}

    def state_extra(self) -> dict[str, Any]:
        """The extra state that shapes this delta like its own ``state_dict()`` (the Hugging Face
        layout saves that one, for Trainer to resume): ``extra_state()`` unless a method saves
        ``delta_state_dict()`` in another shape (a folded reparameterization)."""
        return self.extra_state()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``extra_state`` (or ``state_extra``); called before the tensors are loaded."""

