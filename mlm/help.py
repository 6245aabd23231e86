"""`python run.py --help`: every config group with a line on each option, and every key with its value and a line on it.

The lines come from where they are already written, read here and nowhere else: an option's from the first sentence of
its file's leading comment (conf/<group>/<option>.yaml), a key's from its field in the schema (mlm/config.py:
`name: type = setting(default, "what it does", resume=...)`). Hydra prints `hydra.help.template`
(conf/hydra/help/mlm.yaml), which calls the resolver registered by mlm.cli.register: `help_text`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List

from mlm.config import CONF, GROUPS, Config, choices_of, schema_fields

WIDTH = 110  # a description longer than this is cut at a word, with "..."


def option_description(path: Path) -> str:
    """The first sentence of a group file's leading comment (its `# @package` line and command examples skipped),
    else its first line of settings."""
    lines = path.read_text().splitlines()
    words: List[str] = []
    for line in lines:
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if body.startswith("@package") or line.startswith("#  "):  # the package line; an indented command example
            if words:
                break
            continue
        words.append(body)
    text = " ".join(words) or next((line.strip() for line in lines if line.strip() and not line.startswith("#")), "")
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return shorten(sentence)


def shorten(text: str) -> str:
    return text if len(text) <= WIDTH else text[:WIDTH].rsplit(" ", 1)[0] + " ..."


def shown(value: Any) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value).replace('"', "'")
    if value == "":
        return "''"
    return str(value)


def value_of(root, key: str) -> Any:
    """The composed config's value at `key` (this command's, overrides included), or the schema's default where none resolves."""
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.select(root, key, throw_on_missing=False)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception:  # an interpolation that resolves only inside a job (${hydra:...})
        return OmegaConf.select(root, key, throw_on_missing=False)


def group_lines(choices: Dict[str, str]) -> List[str]:
    lines = []
    for group in GROUPS:
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        chosen = choices.get(group)
        lines.append(f"{group}=" + "|".join(options) + (f"   (now: {chosen})" if chosen else ""))
        width = max(len(o) for o in options)
        lines += [f"  {o:<{width}}  {option_description(CONF / group / f'{o}.yaml')}" for o in options]
    return lines


def key_lines(root) -> List[str]:
    pairs = []
    for key, (f, kind) in schema_fields().items():
        allowed, description = choices_of(kind), f.metadata["description"]
        if allowed and "|" not in description:
            description += f" [{'|'.join(allowed)}]"
        pairs.append((f"{key}={shown(value_of(root, key))}", description))
    width = min(48, max(len(left) for left, _ in pairs))
    return [
        f"{left:<{width}}  {description}" if len(left) <= width else f"{left}\n{'':<{width}}  {description}"
        for left, description in pairs
    ]


def help_text(root=None) -> str:
    """The whole --help page for the composed config `root` (its values; None: the schema's defaults)."""
    from omegaconf import OmegaConf

    if root is None:
        root = OmegaConf.structured(Config)
    choices = OmegaConf.select(root, "hydra.runtime.choices", default=None, throw_on_missing=False)
    choices = {str(k): str(v) for k, v in (choices or {}).items() if v is not None}
    page = [
        "Train and evaluate a masked language model (docs: README.md, docs/).",
        "  python run.py [group=option ...] [key=value ...]      one run; add -m and comma-separated values to sweep",
        "  python run.py <overrides> --help                      this page with the values those overrides give",
        "",
        "== Config groups (group=option: a file of settings under conf/<group>/) ==",
        *group_lines(choices),
        "",
        "== Keys (key=value: shown with this command's value, then what it does) ==",
        *key_lines(root),
        "",
        "Hydra's own flags: --hydra-help; the composed config: --cfg job; a sweep's settings: -m ... --cfg hydra",
    ]
    return "\n".join(page).replace("$", "$$")  # Hydra substitutes $NAME in the template (string.Template)
