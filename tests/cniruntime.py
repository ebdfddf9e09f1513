"""A container runtime's side of CNI, as libcni (containerd, CRI-O, the kubelet) does it: the
first network config in /etc/cni/net.d, its plugins run from /opt/cni/bin.

ADD runs the plugins of the list in order, each given the list's name and cniVersion, the
runtime's capability arguments as `runtimeConfig` where the plugin declares the capability, and
the previous plugin's result as `prevResult`; the last result is cached in /var/lib/cni/results
and printed. DEL runs them in reverse order with the cached result as `prevResult` and forgets
it. Run as `python -m tests.cniruntime ADD|DEL CONTAINER_ID NETNS_PATH IFNAME [CAPABILITY_ARGS]`
(a JSON object, e.g. {"portMappings": [...]}); a plugin's error goes to stderr, exit status 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

NET_DIR = "/etc/cni/net.d"
CNI_PATH = "/opt/cni/bin"
CACHE_DIR = "/var/lib/cni/results"
# What libcni reads from NET_DIR.
CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")


class PluginError(Exception):
    pass


def network_list(net_dir: str = NET_DIR) -> dict:
    """The first config by file name, as containerd picks it; a single .conf becomes a list of
    one plugin."""
    names = sorted(name for name in os.listdir(net_dir) if name.endswith(CONFIG_EXTENSIONS))
    if not names:
        raise PluginError(f"no network config in {net_dir}")
    with open(os.path.join(net_dir, names[0])) as f:
        config = json.load(f)
    if "plugins" not in config:
        config = {"name": config["name"], "cniVersion": config.get("cniVersion", ""),
                  "plugins": [config]}
    return config


def plugin_config(network: dict, plugin: dict, capability_args: dict,
                  prev_result: dict | None) -> dict:
    """libcni's buildOneConfig and injectRuntimeConfig."""
    config = {**plugin, "name": network["name"], "cniVersion": network["cniVersion"]}
    if prev_result is not None:
        config["prevResult"] = prev_result
    capabilities = plugin.get("capabilities", {})
    runtime_config = {name: value for name, value in capability_args.items()
                      if capabilities.get(name)}
    if runtime_config:
        config["runtimeConfig"] = runtime_config
    return config


def exec_plugin(command: str, config: dict, container_id: str, netns: str,
                ifname: str) -> dict | None:
    plugin = os.path.join(CNI_PATH, config["type"])
    if not os.access(plugin, os.X_OK):
        raise PluginError(f'failed to find plugin "{config["type"]}" in path [{CNI_PATH}]')
    # libcni passes its own environment on, with the CNI_* variables set.
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
           "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_ARGS": "", "CNI_PATH": CNI_PATH}
    done = subprocess.run([plugin], input=json.dumps(config).encode(), env=env,
                          capture_output=True, timeout=60)
    if done.returncode != 0:
        raise PluginError(f"{config['type']} {command} failed ({done.returncode}): "
                          f"{done.stdout.decode()}{done.stderr.decode()}")
    return json.loads(done.stdout) if done.stdout.strip() else None


def cache_path(network: dict, container_id: str, ifname: str) -> str:
    return os.path.join(CACHE_DIR, f"{network['name']}-{container_id}-{ifname}")


def add(container_id: str, netns: str, ifname: str, capability_args: dict) -> dict | None:
    network = network_list()
    result = None
    for plugin in network["plugins"]:
        config = plugin_config(network, plugin, capability_args, result)
        result = exec_plugin("ADD", config, container_id, netns, ifname)
    os.makedirs(CACHE_DIR, exist_ok=True)
    with open(cache_path(network, container_id, ifname), "w") as f:
        json.dump({"kind": "cniCacheV1", "containerId": container_id, "ifName": ifname,
                   "networkName": network["name"], "result": result}, f)
    return result


def delete(container_id: str, netns: str, ifname: str, capability_args: dict) -> None:
    network = network_list()
    cached = None
    path = cache_path(network, container_id, ifname)
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)["result"]
    for plugin in reversed(network["plugins"]):
        config = plugin_config(network, plugin, capability_args, cached)
        exec_plugin("DEL", config, container_id, netns, ifname)
    if os.path.exists(path):
        os.unlink(path)


def main(argv: list[str]) -> int:
    command, container_id, netns, ifname, *rest = argv
    capability_args = json.loads(rest[0]) if rest else {}
    try:
        if command == "ADD":
            print(json.dumps(add(container_id, netns, ifname, capability_args)))
        elif command == "DEL":
            delete(container_id, netns, ifname, capability_args)
        else:
            raise PluginError(f"unknown command {command}")
    except PluginError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
