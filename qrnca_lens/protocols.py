"""What qrnca-lens needs of a model, as structural types (no TransformerLens import, so TL 3.x and 4.x both fit).

``HookedModel`` is the surface every model-touching function uses: a TL 4.x ``TransformerBridge`` (in
compatibility mode), a TL 3.x ``HookedTransformer`` or a subclass such as SAELens' ``HookedSAETransformer``.
It mirrors ``transformer_lens.model_protocol.TransformerLensModel`` (TL 4.x only) plus the hook registry and
the torch module methods we call. Weights and submodules (``W_out``, ``W_U``, ``ln_final``, ``unembed``,
``blocks``) are not members: a structural check (beartype under pytest) would evaluate ``W_out``, which stacks
every layer's weights, and cannot see submodules, which live in ``nn.Module._modules``. ``models`` reaches
them through named accessors (``models.W_out``, ``models.final_norm``, ...), the only place that does.

Example:
    >>> from qrnca_lens.protocols import HookedModel
    >>> isinstance(object(), HookedModel)
    False
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

__all__ = ["HookedModel", "Positioned"]


@runtime_checkable
class HookedModel(Protocol):
    """A TransformerLens model: config, tokenizer, hook registry, hooked forward, torch parameters.

    Example:
        >>> isinstance(load_model("smollm2"), HookedModel)   # doctest: +SKIP
        True
        >>> isinstance(object(), HookedModel)
        False
    """

    @property
    def cfg(self) -> Any: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def hook_dict(self) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def to_tokens(self, *args: Any, **kwargs: Any) -> Any: ...

    def hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterator[Any]: ...

    def modules(self) -> Iterator[Any]: ...


@runtime_checkable
class Positioned(Protocol):
    """Anything that names the position to act at: a ``Prompt`` (its target position) is one. The model layer
    takes this shape, not ``Prompt`` itself, so it needs nothing from ``data/``.

    Example:
        >>> class At:
        ...     target_position = 4
        >>> isinstance(At(), Positioned), isinstance(4, Positioned)
        (True, False)
    """

    @property
    def target_position(self) -> int: ...
