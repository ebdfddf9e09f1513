"""Talking to the Kubernetes API as flanneld's client-go does for its kube subnet manager: the
same ways to find the API and its credentials, the Node lookups, a paged list and a watch of
Nodes, and strategic-merge patches of a Node's status.

On httpx, not on a Kubernetes client library: lightkube, the lightest that does the job, costs
the daemon twice what httpx does (+13.3 against +6.9 MiB, docs/kube-client.md), which leaves no
room under flannel's 50Mi limit once a thousand Nodes are listed; it also has no watch
bookmarks, and its 410 Gone handling replays without deletions. What is left to this module is
small: configuration, a few GETs, one streaming watch and a PATCH.

Where the API is (flanneld's clientcmd.BuildConfigFromFlags):
- `--kubeconfig-file`: that kubeconfig's current context, `--kube-api-url` replacing its server;
- `--kube-api-url` alone: that URL with no credentials;
- neither: in a Pod (KUBERNETES_SERVICE_HOST and _PORT, the ServiceAccount's token and CA), else
  $KUBECONFIG or ~/.kube/config.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger("pyflanneld.kube")
# httpx logs every request, the watch among them, at INFO: a DaemonSet's log would fill with them.
logging.getLogger("httpx").setLevel(logging.WARNING)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
REQUEST_SECONDS = 30.0
USER_AGENT = "pyflanneld (flanneld-v0.20.2 compatible)"


class KubeConfigError(Exception):
    """No usable way to the API server; flanneld's words where it has some."""


class KubeApiError(Exception):
    """The API server could not be reached or refused a request; `status` is the HTTP status
    (0 when no answer came)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class WatchExpired(KubeApiError):
    """The watch's resourceVersion is too old (410 Gone): list again."""


@dataclass(frozen=True)
class ApiTarget:
    """Where the API server is and how to authenticate to it."""

    server: str
    ca_file: str | None = None  # None: the system's roots
    insecure: bool = False  # the kubeconfig's insecure-skip-tls-verify
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    token_file: str | None = None  # read at every request: a ServiceAccount token rotates
    inline_dir: str | None = None  # the kubeconfig's inline *-data as files: gone once read


class _Bearer(httpx.Auth):
    def __init__(self, token: str | None, token_file: str | None) -> None:
        self._token = token
        self._token_file = token_file

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._token
        if self._token_file is not None:
            with open(self._token_file) as f:
                token = f.read().strip()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request


def _data_file(data: str, directory: str, name: str) -> str:
    """A kubeconfig's inline `*-data` (base64) as a file of its own, for ssl to load."""
    path = os.path.join(directory, name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(base64.b64decode(data))
    return path


def _named(entries: Any, name: str, kind: str, path: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(kind)
            return value if isinstance(value, dict) else {}
    raise KubeConfigError(f"fail to create kubernetes config: {path}: no {kind} named {name!r}")


def from_kubeconfig(path: str, api_url: str | None) -> ApiTarget:
    """The current context of a kubeconfig file (relative paths in it are relative to it)."""
    import yaml  # only --kubeconfig-file needs it (0.85 MiB)

    try:
        with open(path) as f:
            loaded = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise KubeConfigError(f"fail to create kubernetes config: {err}") from None
    if not isinstance(loaded, dict):
        raise KubeConfigError(f"fail to create kubernetes config: {path} is not a kubeconfig")
    context = _named(loaded.get("contexts"), loaded.get("current-context", ""), "context", path)
    cluster = _named(loaded.get("clusters"), context.get("cluster", ""), "cluster", path)
    user = _named(loaded.get("users"), context.get("user", ""), "user", path) \
        if context.get("user") else {}
    base = os.path.dirname(os.path.abspath(path))
    inline: list[str] = []

    def file_of(section: dict[str, Any], key: str) -> str | None:
        if section.get(f"{key}-data"):
            if not inline:
                inline.append(tempfile.mkdtemp(prefix="pyflanneld-kubeconfig-"))
            return _data_file(section[f"{key}-data"], inline[0], key)
        value = section.get(key)
        return os.path.join(base, value) if isinstance(value, str) and value else None

    server = api_url or cluster.get("server")
    if not isinstance(server, str) or not server:
        raise KubeConfigError(f"fail to create kubernetes config: {path}: no server")
    return ApiTarget(server.rstrip("/"), ca_file=file_of(cluster, "certificate-authority"),
                     insecure=bool(cluster.get("insecure-skip-tls-verify")),
                     cert_file=file_of(user, "client-certificate"),
                     key_file=file_of(user, "client-key"), token=user.get("token"),
                     token_file=file_of(user, "tokenFile"),
                     inline_dir=inline[0] if inline else None)


def in_cluster(environ: dict[str, str], account_dir: str = SERVICE_ACCOUNT_DIR
               ) -> ApiTarget | None:
    """The API as a Pod sees it: None outside one."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    token_file = os.path.join(account_dir, "token")
    if not host or not port or not os.path.exists(token_file):
        return None
    if ":" in host:
        host = f"[{host}]"
    return ApiTarget(f"https://{host}:{port}", ca_file=os.path.join(account_dir, "ca.crt"),
                     token_file=token_file)


def find_api(kubeconfig: str | None, api_url: str | None, environ: dict[str, str],
             account_dir: str = SERVICE_ACCOUNT_DIR) -> ApiTarget:
    if kubeconfig:
        return from_kubeconfig(kubeconfig, api_url)
    if api_url:
        return ApiTarget(api_url.rstrip("/"))
    log.warning("Neither --kubeconfig nor --master was specified. Using the inClusterConfig. "
                "This might not work.")
    target = in_cluster(environ, account_dir)
    if target is not None:
        return target
    fallback = environ.get("KUBECONFIG") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".kube", "config")
    if os.path.exists(fallback):
        return from_kubeconfig(fallback, None)
    raise KubeConfigError("fail to create kubernetes config: not in a Pod (no "
                          "KUBERNETES_SERVICE_HOST, or no ServiceAccount token) and no "
                          "--kubeconfig-file, --kube-api-url or ~/.kube/config")


class KubeClient:
    """The few calls of flanneld's kube subnet manager, on one HTTP/1.1 connection pool."""

    def __init__(self, target: ApiTarget) -> None:
        verify: ssl.SSLContext | bool = True
        try:
            if target.server.startswith("https://"):
                if target.insecure:
                    verify = False
                else:
                    verify = ssl.create_default_context(cafile=target.ca_file)
                    if target.cert_file and target.key_file:
                        verify.load_cert_chain(target.cert_file, target.key_file)
        except (OSError, ssl.SSLError) as err:
            raise KubeConfigError(f"fail to create kubernetes config: {err}") from None
        finally:
            if target.inline_dir is not None:
                shutil.rmtree(target.inline_dir, ignore_errors=True)
        self.server = target.server
        self._http = httpx.AsyncClient(
            base_url=target.server, verify=verify, auth=_Bearer(target.token, target.token_file),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            timeout=httpx.Timeout(REQUEST_SECONDS))

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The answer's JSON. Its body is read here, not kept by httpx's Response: a Response
        and its stream refer to each other, so one whose body was read whole (request(),
        aread()) lives on with it until the cycle collector's next full pass, which a daemon
        holding thousands of leases rarely runs. A listing's pages (360 KB each at 50
        kubelet-sized Nodes) piled up so: listing 5,000 Nodes raised the daemon's peak RSS by
        9.8 MiB, and by 5.6 MiB read this way (perf/SCALE.md)."""
        try:
            async with self._http.stream(method, path, **kwargs) as response:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
        except httpx.HTTPError as err:
            raise KubeApiError(f"{method} {path}: {err or type(err).__name__}") from None
        if response.status_code >= 400:
            raise KubeApiError(f"{method} {path}: {response.status_code} "
                               f"{_message(body)}", response.status_code)
        try:
            return json.loads(body)
        except ValueError:
            raise KubeApiError(f"{method} {path}: the answer is not JSON") from None

    async def _get(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, None when there is none."""
        try:
            return await self._request("GET", path)
        except KubeApiError as err:
            if err.status == 404:
                return None
            raise

    async def get_node(self, name: str) -> dict[str, Any] | None:
        return await self._get(f"/api/v1/nodes/{name}")

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(f"/api/v1/namespaces/{namespace}/pods/{name}")

    async def pod_node_name(self, namespace: str, pod: str) -> str:
        """The Node a Pod runs on (flanneld's way when NODE_NAME is not set)."""
        try:
            spec = (await self._request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
                    ).get("spec", {})
        except KubeApiError as err:
            raise KubeApiError(f"error retrieving pod spec for '{namespace}/{pod}': {err}",
                               err.status) from None
        name = spec.get("nodeName") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name:
            raise KubeConfigError(f"node name not present in pod spec '{namespace}/{pod}'")
        return name

    async def patch_node_status(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A strategic-merge PATCH of nodes/<name>/status, which may change the Node's
        metadata and status both and needs only `nodes/status patch` (flannel#681)."""
        return await self._request(
            "PATCH", f"/api/v1/nodes/{name}/status",
            content=json.dumps(patch, separators=(",", ":")).encode(),
            headers={"Content-Type": STRATEGIC_MERGE})

    async def list_nodes(self, page: int) -> AsyncIterator[dict[str, Any] | str]:
        """Every Node, `page` at a time from etcd (a list from the watch cache comes whole: 76
        MiB for a thousand Nodes, docs/kube-client.md), then the list's resourceVersion."""
        token = ""
        while True:
            params = {"limit": str(page)}
            if token:
                params["continue"] = token
            answer = await self._request("GET", "/api/v1/nodes", params=params)
            for node in answer.get("items") or []:
                yield node
            metadata = answer.get("metadata") or {}
            token = metadata.get("continue") or ""
            if not token:
                yield str(metadata.get("resourceVersion", ""))
                return

    async def watch_nodes(self, resource_version: str, timeout_seconds: int
                          ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The Nodes' changes after `resource_version` as (type, object): ADDED, MODIFIED,
        DELETED and BOOKMARK; ends when the server ends the watch (after `timeout_seconds`).
        WatchExpired when the version is too old, KubeApiError when the stream breaks."""
        params = {"watch": "1", "resourceVersion": resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        path = "/api/v1/nodes"
        try:
            async with self._http.stream(
                    "GET", path, params=params,
                    timeout=httpx.Timeout(REQUEST_SECONDS, read=timeout_seconds + 30)) as stream:
                if stream.status_code == 410:
                    raise WatchExpired(f"watch from {resource_version}: 410 Gone", 410)
                if stream.status_code >= 400:
                    raise KubeApiError(f"GET {path}?watch: {stream.status_code} "
                                       f"{_message(await stream.aread())}", stream.status_code)
                async for line in stream.aiter_lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        code = obj.get("code", 0)
                        if code == 410:
                            raise WatchExpired(f"watch from {resource_version}: "
                                               f"{obj.get('message', '410 Gone')}", 410)
                        raise KubeApiError(f"watch: {obj.get('message', obj)}", code)
                    yield kind, obj
        except httpx.HTTPError as err:
            raise KubeApiError(f"watch: {err or type(err).__name__}") from None
        except json.JSONDecodeError as err:
            raise KubeApiError(f"watch: an event that is not JSON: {err}") from None


def _message(body: bytes) -> str:
    """The `message` of a Kubernetes Status, else the body's start."""
    try:
        status = json.loads(body)
        if isinstance(status, dict) and isinstance(status.get("message"), str):
            return status["message"]
    except ValueError:
        pass
    return body[:200].decode(errors="replace")
