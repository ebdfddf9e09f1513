"""control.subnet.kubeclient's ways to the API server, as client-go's BuildConfigFromFlags finds
them: a kubeconfig (files or inline data), --kube-api-url, a Pod's ServiceAccount, ~/.kube/config.
The requests themselves run against the real API server in tests/test_kube.py."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
import yaml

from control.subnet.kubeclient import (
    KubeClient,
    KubeConfigError,
    find_api,
    from_kubeconfig,
    in_cluster,
)


def kubeconfig(path: Path, cluster: dict[str, object], user: dict[str, object]) -> str:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
        "contexts": [{"name": "other", "context": {"cluster": "nope", "user": "nope"}},
                     {"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}]}))
    return str(path)


def test_a_kubeconfig_s_current_context_with_paths_relative_to_it(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "kc", {"server": "https://198.18.0.9:6443/",
                                        "certificate-authority": "ca.pem"},
                      {"client-certificate": "node.pem", "client-key": "/abs/node.key"})
    target = from_kubeconfig(path, None)
    assert target.server == "https://198.18.0.9:6443"
    assert target.ca_file == str(tmp_path / "ca.pem")
    assert (target.cert_file, target.key_file) == (str(tmp_path / "node.pem"), "/abs/node.key")
    assert target.inline_dir is None
    assert from_kubeconfig(path, "https://198.18.0.10:443").server == "https://198.18.0.10:443"


def test_inline_data_becomes_private_files_that_go_once_read(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n"
    path = kubeconfig(tmp_path / "kc", {
        "server": "https://198.18.0.9:6443",
        "certificate-authority-data": base64.b64encode(pem).decode()}, {"token": "t0k"})
    target = from_kubeconfig(path, None)
    assert target.token == "t0k" and target.ca_file is not None and target.inline_dir
    with open(target.ca_file, "rb") as f:
        assert f.read() == pem
    assert os.stat(target.ca_file).st_mode & 0o777 == 0o600
    with pytest.raises(KubeConfigError, match="fail to create kubernetes config"):
        KubeClient(target)  # not a real CA: refused, and the files are removed all the same
    assert not os.path.exists(target.inline_dir)


def test_a_kubeconfig_that_names_what_it_lacks_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kc"
    path.write_text(yaml.safe_dump({"current-context": "missing", "contexts": []}))
    with pytest.raises(KubeConfigError, match="no context named 'missing'"):
        from_kubeconfig(str(path), None)
    with pytest.raises(KubeConfigError, match="fail to create kubernetes config"):
        from_kubeconfig(str(tmp_path / "absent"), None)


def test_in_a_pod_the_service_account_and_the_service_address(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token\n")
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    target = in_cluster(environ, str(tmp_path))
    assert target is not None and target.server == "https://10.96.0.1:443"
    assert target.token_file == str(tmp_path / "token")
    assert target.ca_file == str(tmp_path / "ca.crt")
    v6 = in_cluster({**environ, "KUBERNETES_SERVICE_HOST": "fd00::1"}, str(tmp_path))
    assert v6 is not None and v6.server == "https://[fd00::1]:443"
    assert in_cluster({}, str(tmp_path)) is None
    assert in_cluster(environ, str(tmp_path / "nowhere")) is None


def test_the_order_client_go_finds_the_api_in(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "token").write_text("sa-token")
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
               "HOME": str(tmp_path)}
    path = kubeconfig(tmp_path / "kc", {"server": "https://198.18.0.9:6443"}, {})
    assert find_api(path, None, environ, str(tmp_path)).server == "https://198.18.0.9:6443"
    only_url = find_api(None, "http://198.18.0.7:8080", environ, str(tmp_path))
    assert only_url.server == "http://198.18.0.7:8080" and only_url.token_file is None
    assert not caplog.records
    assert find_api(None, None, environ, str(tmp_path)).server == "https://10.96.0.1:443"
    assert "Neither --kubeconfig nor --master was specified" in caplog.text
    fallback = {"KUBECONFIG": path}
    assert find_api(None, None, fallback, str(tmp_path / "no")).server == (
        "https://198.18.0.9:6443")
    with pytest.raises(KubeConfigError, match="not in a Pod"):
        find_api(None, None, {"KUBECONFIG": str(tmp_path / "absent")}, str(tmp_path / "no"))
