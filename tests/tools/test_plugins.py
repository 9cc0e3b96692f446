import sys

import pytest

from funnel.recall.plugin import registered, unregister_channel
from funnel.tools.cli import main
from funnel.tools.plugins import PluginError, load_plugins

PLUGIN = '''
import numpy as np
from funnel.recall.plugin import register_channel

@register_channel
class Nothing:
    name, default_count = "toy_nothing", 3

    @classmethod
    def fit(cls, data, mask):
        return cls()

    def candidates(self, query, k):
        return np.zeros((len(query.user_vecs), 0), np.int64)

    def save(self, directory):
        pass

    @classmethod
    def load(cls, directory):
        return cls()
'''


def test_funnel_plugins_names_modules_the_command_line_imports(tmp_path, monkeypatch):
    (tmp_path / "toy_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FUNNEL_PLUGINS", "toy_plugin")
    try:
        assert load_plugins() == ["toy_plugin"]
        assert "toy_nothing" in registered()
    finally:
        unregister_channel("toy_nothing")
        sys.modules.pop("toy_plugin", None)


def test_a_broken_plugin_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('no licence file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FUNNEL_PLUGINS", "broken_plugin")
    with pytest.raises(PluginError, match="'broken_plugin' .* RuntimeError: no licence file"):
        load_plugins()
    assert main(["verify", str(tmp_path)]) == 2
    assert "plugin module 'broken_plugin'" in capsys.readouterr().err
