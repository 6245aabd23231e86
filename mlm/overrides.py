"""What a command line's overrides may say, and the typed config they compose: run.py and `python -m mlm.downstream`
check them before Hydra composes anything; tests and benchmarks compose the config a command would run with."""

from __future__ import annotations

import difflib
import typing
from typing import Any, Dict, List

from omegaconf import OmegaConf

from mlm.config import CONF, GROUPS, Config, UserError, choices_of, register_configs, schema_fields


def schema_keys() -> Dict[str, Any]:
    """Every key of the typed config as a dotted path -> its type (Dict fields take free-form keys below them)."""
    return {key: kind for key, (_, kind) in schema_fields().items()}


def check_override_keys(args: List[str]) -> None:
    """Command-line overrides name real keys and allowed values: a misspelled key (with the closest real one), or a value
    outside a choice (sweep lists included), gets one line (UserError) before Hydra composes anything (Hydra's
    advice for an unknown key, `+key=value`, is wrong for a typed config, and its choice error ends a sweep midway)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys, parser = schema_keys(), OverridesParser.create()
    for arg in args:
        try:
            override = parser.parse_overrides([arg])[0]
        except Exception:  # a flag, or a line Hydra will explain itself
            continue
        key = override.key_or_group
        if key in GROUPS or "/" in key or key.split(".")[0] == "hydra" or override.is_delete():
            continue
        if key not in keys:
            if not any(
                typing.get_origin(kind) in (dict, Dict) and key.startswith(path + ".") for path, kind in keys.items()
            ):
                raise UserError(unknown_key_line(key, keys))
            continue  # model.arch.<any config field>
        allowed = choices_of(keys[key])
        if allowed is not None:
            bad = [v for v in override_values(override) if v not in allowed]
            if bad:
                raise UserError(f"{key}={bad[0]} is not one of {', '.join(allowed)}")


def override_values(override) -> List[str]:
    """The string values an override gives its key: each of a choice sweep's, each of a list's, or the one."""
    if override.is_sweep_override():
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # an interval sweep: not a choice field's
            return []
    value = override.value()
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def unknown_key_line(key: str, keys: Dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(keys) + list(GROUPS), n=1, cutoff=0.6)
    return f"unknown config key {key!r}" + (
        f"; did you mean {close[0]}?" if close else "; python run.py --help lists the keys"
    )


def compose(overrides=()) -> Config:
    """The config `python run.py <overrides>` runs with (conf/ of this checkout, composed by Hydra), as the typed Config."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="config", overrides=list(overrides)))
