"""`flannel`: flannel's CNI plugin (cni-plugin v1.1.0), for container runtimes and Kubernetes.

With `{"type": "flannel"}` in /etc/cni/net.d it reads the daemon's subnet.env, writes the
delegate's config (by default the `bridge` plugin with `host-local` IPAM on this host's subnet),
keeps it per container under dataDir so that DEL works whatever happened since, and runs the
delegate. Same config keys, same delegate config (byte for byte: Go's sorted-key JSON), same
error codes and messages as flannel's build. CHECK runs the delegate's CHECK where flannel's
answers nothing.

It runs once per container: it imports only the standard library's smallest parts.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys

# typing and subprocess would double the plugin's start-up: annotations name only builtins and
# the delegate runs through os.posix_spawn.

SUPPORTED_VERSIONS = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
# CNI's skel: the variables each command needs (DEL works without the container's netns).
REQUIRED_ENV = {"ADD": ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
                "CHECK": ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
                "DEL": ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"]}
# CNI's rule for network names and container IDs (Go's $ is the end of the text: \Z here).
VALID_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*\Z")
INVALID_NETWORK_CONFIG = 7
UNKNOWN_CONTAINER = 3

# How Go's encoding/json names a JSON value's type in its errors.
JSON_TYPES = {str: "string", int: "number", float: "number", bool: "bool", list: "array"}
# The CNI spec's error codes.
INCOMPATIBLE_VERSION = 1
INVALID_ENVIRONMENT = 4
DECODING_FAILURE = 6
INTERNAL = 999


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def json(self) -> str:
        error: dict[str, object] = {"code": self.code, "msg": self.msg}
        if self.details:
            error["details"] = self.details
        return json.dumps(error, indent=4)


# What Go's encoding/json escapes in strings that Python's json writes as they are (neither
# character can stand outside a string in JSON).
GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                            "\u2028": "\\u2028", "\u2029": "\\u2029"})


def go_json(value: object) -> bytes:
    """JSON as Go's encoding/json writes a map: sorted keys, no spaces, UTF-8 as it is, and
    <, >, & and the two Unicode line separators escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.translate(GO_ESCAPES).encode()


def _os_error(path: str, err: OSError) -> str:
    """An OSError in Go's words: "open /run/flannel/subnet.env: no such file or directory"."""
    reason = err.strerror or str(err)
    return f"open {path}: {reason[:1].lower()}{reason[1:]}"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def load_netconf(conf: dict[str, object]) -> dict[str, object]:
    """The config as flannel's plugin takes it once CNI's skel has checked it: a supported
    cniVersion, and its own keys of the right types."""
    version = conf.get("cniVersion") or "0.1.0"
    if version not in SUPPORTED_VERSIONS:
        quoted = " ".join(f'"{v}"' for v in SUPPORTED_VERSIONS)
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f'config is "{version}", plugin supports [{quoted}]')
    delegate = conf.get("delegate")
    if delegate is not None and not isinstance(delegate, dict):
        raise CniError(INTERNAL, "failed to load netconf: json: cannot unmarshal "
                       f"{JSON_TYPES.get(type(delegate), 'value')} into Go struct field "
                       "NetConf.delegate of type map[string]interface {}")
    for key in ("ipam", "runtimeConfig"):
        if conf.get(key) is not None and not isinstance(conf[key], dict):
            raise CniError(INTERNAL, f"failed to load netconf: {key} must be a JSON object")
    return conf


def load_subnet_env(path: str) -> dict[str, object]:
    """subnet.env as flannel's plugin reads it (IPv6 variables included)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise CniError(INTERNAL, _os_error(path, err)) from err
    env: dict[str, object] = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if key in ("FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK", "FLANNEL_SUBNET",
                   "FLANNEL_IPV6_SUBNET") and sep:
            env[key] = _cidr(value)
        elif key == "FLANNEL_MTU" and sep:
            if not (value.isascii() and value.isdigit()):
                raise CniError(INTERNAL, f'strconv.ParseUint: parsing "{value}": invalid syntax')
            if int(value) >= 1 << 32:  # flannel's parses it as a uint32
                raise CniError(INTERNAL,
                               f'strconv.ParseUint: parsing "{value}": value out of range')
            env[key] = int(value)
        elif key == "FLANNEL_IPMASQ" and sep:
            env[key] = value == "true"
    missing = []
    if "FLANNEL_NETWORK" not in env and "FLANNEL_IPV6_NETWORK" not in env:
        missing.append("FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK")
    if "FLANNEL_SUBNET" not in env and "FLANNEL_IPV6_SUBNET" not in env:
        missing.append("FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET")
    for key in ("FLANNEL_MTU", "FLANNEL_IPMASQ"):
        if key not in env:
            missing.append(key)
    if missing:
        raise CniError(INTERNAL, f"{path} is missing {', '.join(missing)}")
    return env


def _cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network as Go's net.ParseCIDR takes it: a prefix length in decimal is required (no
    netmask, which Python would take), and an IPv6 address has no zone."""
    address, sep, length = value.partition("/")
    if sep and length.isascii() and length.isdigit() and "%" not in address:
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
    raise CniError(INTERNAL, f"invalid CIDR address: {value}")


def _go_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as Go's net.IP prints it: Python's text, but IPv4-mapped ones dotted."""
    mapped = getattr(address, "ipv4_mapped", None)
    return str(address if mapped is None else mapped)


def _go_cidr(address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefixlen: int) -> str:
    """An address and length as Go's net.IPNet prints them: an IPv4-mapped address is dotted
    and its length counts the last 32 bits only (::ffff:a00:0/120 is 10.0.0.0/24)."""
    if getattr(address, "ipv4_mapped", None) is not None:
        prefixlen = max(prefixlen - 96, 0)
    return f"{_go_ip(address)}/{prefixlen}"


def _routes_error(msg: str) -> CniError:
    return CniError(INTERNAL, "failed to assemble Delegate IPAM: failed to read IPAM routes: "
                    f"failed to parse ipam.routes: {msg}")


def _json_type(value: object) -> str:
    return JSON_TYPES.get(type(value), "object")


def _ipam_routes(ipam: dict[str, object]) -> list[dict[str, str]]:
    """ipam.routes as flannel's plugin hands them on: decoded into CNI's types.Route and
    encoded again, so that of each route only dst (as given, not masked) and a gw stay, in
    Go's text; a route without dst has the dst "<nil>"."""
    routes = ipam.get("routes")
    if routes is None:
        return []
    if not isinstance(routes, list):
        raise _routes_error(f"json: cannot unmarshal {_json_type(routes)} into Go value of "
                            "type []types.Route")
    decoded = []
    for route in routes:
        if route is None:
            route = {}
        if not isinstance(route, dict):
            raise _routes_error(f"json: cannot unmarshal {_json_type(route)} into Go value of "
                                "type types.route")
        fields = {key.lower(): value for key, value in route.items()}
        out = {"dst": "<nil>"}
        if "dst" in fields:
            dst = fields["dst"] if fields["dst"] is not None else ""
            if not isinstance(dst, str):
                raise _routes_error(f"json: cannot unmarshal {_json_type(dst)} into Go struct "
                                    "field route.dst of type string")
            try:
                _cidr(dst)  # Go's net.ParseCIDR's rules, and its error
            except CniError as err:
                raise _routes_error(err.msg) from err
            address, _, length = dst.partition("/")
            out["dst"] = _go_cidr(ipaddress.ip_address(address), int(length))
        gw = fields.get("gw")
        if gw is not None and not isinstance(gw, str):
            raise _routes_error(f"json: cannot unmarshal {_json_type(gw)} into Go struct "
                                "field route.gw of type net.IP")
        if gw:
            try:
                if "%" in gw:  # Go's ParseIP takes no zone
                    raise ValueError(gw)
                out["gw"] = _go_ip(ipaddress.ip_address(gw))
            except ValueError:
                raise _routes_error(f"invalid IP address: {gw}") from None
        decoded.append(out)
    return decoded


def delegate_config(conf: dict[str, object], env: dict[str, object]) -> dict[str, object]:
    """flannel's delegate: the `delegate` dict completed from subnet.env, IPAM included."""
    delegate = dict(conf.get("delegate") or {})
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CniError(INTERNAL, "'delegate' dictionary, if present, must have (string) "
                       "'type' field")
    if "name" in delegate:
        raise CniError(INTERNAL, "'delegate' dictionary must not have 'name' field, it'll be "
                       "set by flannel")
    if "ipam" in delegate:
        raise CniError(INTERNAL, "'delegate' dictionary must not have 'ipam' field, it'll be "
                       "set by flannel")
    if conf.get("runtimeConfig") is not None:
        delegate["runtimeConfig"] = conf["runtimeConfig"]
    delegate["name"] = conf.get("name", "")
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not env["FLANNEL_IPMASQ"])
    delegate.setdefault("mtu", env["FLANNEL_MTU"])
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    if conf.get("cniVersion"):
        delegate["cniVersion"] = conf["cniVersion"]
    ipam = dict(conf.get("ipam") or {})
    ipam.setdefault("type", "host-local")
    ipam["ranges"] = [[{"subnet": _go_cidr(env[key].network_address, env[key].prefixlen)}]
                      for key in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET") if key in env]
    routes = _ipam_routes(ipam)
    routes += [{"dst": _go_cidr(env[key].network_address, env[key].prefixlen)}
               for key in ("FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK") if key in env]
    ipam["routes"] = routes
    delegate["ipam"] = ipam
    return delegate


def find_plugin(name: str, cni_path: str) -> str:
    directories = [d for d in cni_path.split(os.pathsep) if d]
    for directory in directories:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(INTERNAL, f'failed to find plugin "{name}" in path '
                   f"[{' '.join(directories)}]")


def run_delegate(command: str, config: bytes) -> bytes:
    """Run the delegate plugin with our environment but `command`; returns its stdout, or
    raises its error (a CNI error JSON on its stdout) as ours."""
    delegate_type = json.loads(config).get("type", "")
    plugin = find_plugin(delegate_type, os.environ.get("CNI_PATH", ""))
    returncode, stdout = spawn(plugin, config, {**os.environ, "CNI_COMMAND": command})
    if returncode == 0:
        return stdout
    try:
        error = json.loads(stdout)
        message = error["msg"] + (f"; {error['details']}" if error.get("details") else "")
    except (ValueError, KeyError, TypeError):
        message = f"netplugin failed: {stdout.decode(errors='replace')}".strip()
    raise CniError(INTERNAL, message)


def spawn(program: str, stdin: bytes, env: dict[str, str]) -> tuple[int, bytes]:
    """Run `program` with `stdin`; its stderr goes where ours goes. Returns (exit code,
    stdout). A plugin reads its whole config before it writes a byte, so writing first and
    reading after cannot deadlock."""
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    try:
        pid = os.posix_spawn(program, [program], env, file_actions=[
            (os.POSIX_SPAWN_DUP2, in_read, 0), (os.POSIX_SPAWN_DUP2, out_write, 1),
            (os.POSIX_SPAWN_CLOSE, in_write), (os.POSIX_SPAWN_CLOSE, out_read)])
    finally:
        os.close(in_read)
        os.close(out_write)
    try:
        with open(in_write, "wb") as pipe:
            pipe.write(stdin)
    except BrokenPipeError:
        pass  # it exited without reading: its stdout and exit code say why
    with open(out_read, "rb") as pipe:
        stdout = pipe.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), stdout


def scratch_path(conf: dict[str, object], container_id: str) -> str:
    return os.path.join(conf.get("dataDir") or DEFAULT_DATA_DIR, container_id)


def cmd_add(conf: dict[str, object], container_id: str) -> bytes:
    env = load_subnet_env(conf.get("subnetFile") or DEFAULT_SUBNET_FILE)
    delegate = go_json(delegate_config(conf, env))
    path = scratch_path(conf, container_id)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "wb") as f:
        f.write(delegate)
    try:
        return run_delegate("ADD", delegate)
    except CniError as err:
        # Kept: the runtime's DEL that follows a failed ADD releases what the delegate took.
        raise CniError(err.code, f"failed to delegate add: {err.msg}") from err


def cmd_del(conf: dict[str, object], container_id: str) -> bytes:
    path = scratch_path(conf, container_id)
    try:
        with open(path, "rb") as f:
            delegate = f.read()
    except FileNotFoundError:
        return b""  # per the spec: resources already gone is not an error
    run_delegate("DEL", delegate)
    os.remove(path)
    return b""


def cmd_check(conf: dict[str, object], container_id: str) -> bytes:
    if _version_key(conf.get("cniVersion") or "0.1.0") < (0, 4, 0):
        raise CniError(INCOMPATIBLE_VERSION, "config version does not allow CHECK")
    path = scratch_path(conf, container_id)
    try:
        with open(path, "rb") as f:
            delegate = json.loads(f.read())
    except OSError as err:
        raise CniError(INTERNAL, _os_error(path, err)) from err
    if isinstance(conf.get("prevResult"), dict):
        delegate["prevResult"] = with_route_gateways(conf["prevResult"])
    return run_delegate("CHECK", go_json(delegate))


def with_route_gateways(result: dict[str, object]) -> dict[str, object]:
    """The result as the interface was configured: ADD (CNI's ipam.ConfigureIface) routes a
    gateway-less route via the address's gateway, but CHECK looks for it without one, so every
    CHECK of flannel's routes would fail (flannel's own CHECK does nothing at all)."""
    gateways = [ip.get("gateway") for ip in result.get("ips") or []
                if isinstance(ip, dict) and ip.get("gateway")]
    routes = []
    for route in result.get("routes") or []:
        if isinstance(route, dict) and not route.get("gw"):
            family = ipaddress.ip_network(route.get("dst", "0.0.0.0/0"), strict=False).version
            gateway = next((g for g in gateways if ipaddress.ip_address(g).version == family),
                           None)
            if gateway:
                route = {**route, "gw": gateway}
        routes.append(route)
    return {**result, "routes": routes} if routes else result


COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check}


def run(command: str, stdin: bytes) -> bytes:
    if not command:  # run by hand: say what this is, as the plugins built on CNI's skel do
        return (f"CNI Plugin flannel (pyflannel)\nCNI protocol versions supported: "
                f"{', '.join(SUPPORTED_VERSIONS)}\n").encode()
    if command == "VERSION":
        return go_json({"cniVersion": SUPPORTED_VERSIONS[-1],
                        "supportedVersions": SUPPORTED_VERSIONS})
    missing = [name for name in REQUIRED_ENV.get(command, []) if not os.environ.get(name)]
    if missing:
        raise CniError(INVALID_ENVIRONMENT,
                       f"required env variables [{','.join(missing)}] missing")
    conf = validate_args(stdin, os.environ.get("CNI_CONTAINERID", ""),
                         os.environ.get("CNI_IFNAME", ""))
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command}")
    return COMMANDS[command](load_netconf(conf), os.environ["CNI_CONTAINERID"])


def validate_args(stdin: bytes, container_id: str, ifname: str) -> dict[str, object]:
    """What CNI's skel checks before any command but VERSION, in its order and words: the
    config's network name, the container ID, the interface name. Returns the config."""
    try:
        conf = json.loads(stdin)
    except json.JSONDecodeError as err:
        # Go's words where the input ends too soon; Python's for other syntax errors.
        reason = ("unexpected end of JSON input" if err.pos >= len(err.doc.rstrip())
                  else str(err))
        raise CniError(DECODING_FAILURE, f"error unmarshall network config: {reason}") from err
    except UnicodeDecodeError as err:
        raise CniError(DECODING_FAILURE, f"error unmarshall network config: {err}") from err
    if not isinstance(conf, dict):
        raise CniError(DECODING_FAILURE, "error unmarshall network config: json: cannot "
                       f"unmarshal {_json_type(conf)} into Go value of type struct {{ Name "
                       'string "json:\\"name\\"" }')
    # Go's decoder matches the key case-insensitively; null leaves the name empty.
    name = next((value for key, value in reversed(conf.items()) if key.lower() == "name"), None)
    if name is not None and not isinstance(name, str):
        raise CniError(DECODING_FAILURE, "error unmarshall network config: json: cannot "
                       f"unmarshal {_json_type(name)} into Go struct field .name of type string")
    if not name:
        raise CniError(INVALID_NETWORK_CONFIG, "missing network name")
    if not VALID_NAME.match(name):
        raise CniError(INVALID_NETWORK_CONFIG, "invalid characters found in network name", name)
    if not container_id:
        raise CniError(UNKNOWN_CONTAINER, "missing containerID")
    if not VALID_NAME.match(container_id):
        raise CniError(INVALID_ENVIRONMENT, "invalid characters in containerID", container_id)
    if not ifname:
        raise CniError(INVALID_ENVIRONMENT, "interface name is empty")
    if len(ifname.encode()) > 15:
        raise CniError(INVALID_ENVIRONMENT, "interface name is too long",
                       "interface name should be less than 16 characters")
    if ifname in (".", ".."):
        raise CniError(INVALID_ENVIRONMENT, "interface name is . or ..")
    if any(c in "/:" or c.isspace() for c in ifname):
        raise CniError(INVALID_ENVIRONMENT,
                       "interface name contains / or : or whitespace characters")
    return conf


def main() -> None:
    try:
        output = run(os.environ.get("CNI_COMMAND", ""), sys.stdin.buffer.read())
    except CniError as err:
        sys.stdout.write(err.json())
        sys.stdout.flush()
        sys.exit(1)
    sys.stdout.buffer.write(output)
    sys.stdout.flush()
    sys.exit(0)


if __name__ == "__main__":
    main()
