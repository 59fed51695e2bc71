"""A what-if for ``benchmarks/scale.py --whatif-flower-config-cache``; fedlora never uses it.

Flower 1.41's simulation engine builds every virtual node's Context by reading and parsing the
app's ``pyproject.toml`` again (``flwr.compat.client.run_info_store`` calls
``get_fused_config_from_dir`` once per node: 100,000 parses for 100,000 nodes, ~59 s of round 1
on this machine). Put on ``PYTHONPATH``, this file makes every Python process Flower starts
parse it once per (app directory, overrides) and hand each node its own copy of the result, so
the benchmark can show what round 1 would take with that fixed in Flower. Nothing else changes.
"""

import json

try:
    from flwr.compat.client import run_info_store as _store
except Exception:  # pragma: no cover - not Flower 1.41's layout: leave everything as it is
    _store = None

if _store is not None and hasattr(_store, "get_fused_config_from_dir"):
    _parse = _store.get_fused_config_from_dir
    _parsed: dict = {}

    def _cached(project_dir, override_config):
        key = (str(project_dir), json.dumps(override_config, sort_keys=True, default=str))
        if key not in _parsed:
            _parsed[key] = _parse(project_dir, override_config)
        return dict(_parsed[key])

    _store.get_fused_config_from_dir = _cached
