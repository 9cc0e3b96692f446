import pytest

from funnel.server.app import ServerOptions, is_loopback, open_without_token
from funnel.tools.cli import main


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"])
def test_loopback_hosts(host):
    assert is_loopback(host) and open_without_token(host, ServerOptions()) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.7", "myhost.example"])
def test_other_hosts_need_a_token(host):
    assert not is_loopback(host)
    assert "--insecure" in open_without_token(host, ServerOptions())
    assert open_without_token(host, ServerOptions(token="s3cret")) is None


def test_serve_refuses_an_open_public_bind_before_loading_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FUNNEL_TOKEN", raising=False)
    assert main(["serve", "--bundle", str(tmp_path / "no-bundle"), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0 without a token" in err and "--insecure" in err
