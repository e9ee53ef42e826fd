"""A mixin for config dataclasses: dict round trip and overrides that name unknown fields."""

from __future__ import annotations

import dataclasses


class ConfigMixin:
    """``to_dict`` / ``from_dict`` / ``replace`` for a dataclass; unknown keys raise ``ValueError``."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def _check_fields(cls, keys) -> None:
        unknown = sorted(set(keys) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")

    @classmethod
    def from_dict(cls, d: dict):
        cls._check_fields(d)
        return cls(**d)

    def replace(self, **overrides):
        self._check_fields(overrides)
        return dataclasses.replace(self, **overrides)
