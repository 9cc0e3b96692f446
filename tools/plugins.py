"""Plugin modules: recall channels and ranking features imported before any ``funnel`` command runs.

A plugin is a module that registers channels (:func:`recall.plugin.register_channel`)
or features (:func:`rank.schema.register_feature`) when imported. The command line
imports every module named by an installed distribution's ``funnel.plugins`` entry
points, then those in ``FUNNEL_PLUGINS`` (comma-separated module names), so training,
evaluation and serving all see the same channels and features.
"""

import importlib
import importlib.metadata
import os

ENTRY_POINT_GROUP = "funnel.plugins"
ENV_VAR = "FUNNEL_PLUGINS"


class PluginError(ImportError):
    """A plugin module could not be imported."""


def plugin_modules() -> list[str]:
    """The module names to import: entry points of group ``funnel.plugins``, then ``$FUNNEL_PLUGINS``, each once."""
    names = [ep.value.split(":")[0] for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    names += [n.strip() for n in os.environ.get(ENV_VAR, "").split(",") if n.strip()]
    return list(dict.fromkeys(names))


def load_plugins() -> list[str]:
    """Import every plugin module.

    Returns:
        The imported module names.

    Raises:
        PluginError: naming the module that failed and why.
    """
    loaded = []
    for name in plugin_modules():
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure in a plugin's import is reported the same way
            raise PluginError(f"plugin module {name!r} (from {ENTRY_POINT_GROUP} or ${ENV_VAR}) failed to import: {type(err).__name__}: {err}") from err
        loaded.append(name)
    return loaded
