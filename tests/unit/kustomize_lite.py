"""A small kustomize renderer for the deploy tests, used when no kustomize binary is available.

It implements exactly the features deploy/ uses and refuses any other (an unknown kustomization
key raises), so it can never silently render something different from kustomize. Where
`kubectl kustomize` exists, the deploy tests also check that both renderers agree.

Supported: `resources` (files and kustomization folders), `patches` with `path` (strategic-merge
patches, target taken from the patch's kind and name), `configMapGenerator` (`files`,
`literals`) with `generatorOptions` (`disableNameSuffixHash: true`, `labels`, `annotations`).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import yaml

_KNOWN = {"apiVersion", "kind", "resources", "patches", "configMapGenerator", "generatorOptions"}

# Strategic merge: lists of these fields merge element-wise by the key (Kubernetes'
# patchMergeKey); every other list is replaced, as Kubernetes does for e.g. tolerations and
# nodeSelectorTerms.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}


def strategic_merge(base, patch, field: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        # kustomize's order: the patch's items first (merged into their base item when the
        # key matches), then the base items the patch does not name.
        key = MERGE_KEYS[field]
        named = {item.get(key) for item in patch}
        out = []
        for item in patch:
            match = next((b for b in base if b.get(key) == item.get(key)), None)
            out.append(copy.deepcopy(item) if match is None else strategic_merge(match, item, None))
        return out + [copy.deepcopy(b) for b in base if b.get(key) not in named]
    return copy.deepcopy(patch)


def _ident(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def render(folder: Path) -> list[dict]:
    """The objects `kustomize build folder` would output (order aside)."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - _KNOWN
    if unknown:
        raise NotImplementedError(f"{folder}: kustomize_lite does not implement {sorted(unknown)}")
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    docs += _generate(folder, spec)
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise NotImplementedError(f"{folder}: only path patches are implemented: {patch}")
        body = yaml.safe_load((folder / patch["path"]).read_text())
        targets = [i for i, d in enumerate(docs) if _ident(d) == _ident(body)]
        if len(targets) != 1:
            raise ValueError(f"{folder}/{patch['path']}: {len(targets)} targets for {_ident(body)}")
        docs[targets[0]] = strategic_merge(docs[targets[0]], body)
    seen = [_ident(d) for d in docs]
    if len(seen) != len(set(seen)):
        raise ValueError(f"{folder}: duplicate objects {seen}")
    return docs


def _generate(folder: Path, spec: dict) -> list[dict]:
    options = spec.get("generatorOptions", {})
    if spec.get("configMapGenerator") and options.get("disableNameSuffixHash") is not True:
        raise NotImplementedError("name suffix hashes are not implemented")
    out = []
    for gen in spec.get("configMapGenerator", []):
        data = {}
        for item in gen.get("files", []):
            key, _, path = item.rpartition("=") if "=" in item else ("", "", item)
            data[key or Path(path).name] = (folder / path).read_text()
        for item in gen.get("literals", []):
            key, _, value = item.partition("=")
            data[key] = value
        meta = {"name": gen["name"]}
        for field in ("labels", "annotations"):
            if options.get(field):
                meta[field] = dict(options[field])
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return out


def kubectl_render(folder: Path) -> list[dict] | None:
    """`kubectl kustomize folder`, or None where kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True,
                         check=True, timeout=120)
    return [d for d in yaml.safe_load_all(out.stdout) if d]
