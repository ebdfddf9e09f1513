"""`pyflannel-docker-opts`: flannel's mk-docker-opts.sh. Reads subnet.env and writes Docker's
daemon options (--bip, --mtu, --ip-masq) to an env file, for a unit that starts dockerd with
them, e.g. `-k DOCKER_NETWORK_OPTIONS` and `dockerd $DOCKER_NETWORK_OPTIONS`.

Its output is the script's, byte for byte: each option as DOCKER_OPT_<NAME>="..." (-i), then
all of them after what the combined key already holds in the environment, as KEY=" ... " (-c);
both when neither is asked. One difference: the script documents -m (leave out --ip-masq) but
its getopts string lacks it, so it refuses -m; here -m works as documented.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from control.host.subnetenv import DEFAULT_SUBNET_FILE, read_variables

DEFAULT_DOCKER_ENV = "/run/docker_opts.env"
OPTION_PREFIX = "DOCKER_OPT_"


def docker_options(flannel: Mapping[str, str], environ: Mapping[str, str],
                   ip_masq: bool) -> dict[str, str]:
    """DOCKER_OPT_* variables, sorted by name as bash's `compgen -v` lists them: the ones
    subnet.env gives, over any already in the environment."""
    options = {key: value for key, value in environ.items() if key.startswith(OPTION_PREFIX)}
    if flannel.get("FLANNEL_SUBNET"):
        options["DOCKER_OPT_BIP"] = f"--bip={flannel['FLANNEL_SUBNET']}"
    if flannel.get("FLANNEL_MTU"):
        options["DOCKER_OPT_MTU"] = f"--mtu={flannel['FLANNEL_MTU']}"
    # flanneld masquerades for the containers, so Docker must not.
    if flannel.get("FLANNEL_IPMASQ") == "true" and ip_masq:
        options["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"
    return dict(sorted(options.items()))


def render(options: Mapping[str, str], combined_key: str, environ: Mapping[str, str],
           individual: bool, combined: bool) -> str:
    lines = [f'{key}="{value}"' for key, value in options.items()] if individual else []
    if combined:
        joined = environ.get(combined_key, "") + " " + "".join(f"{v} " for v in options.values())
        lines.append(f'{combined_key}="{joined}"')
    return "".join(f"{line}\n" for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pyflannel-docker-opts",
        description="Generate Docker daemon options based on flannel env file")
    parser.add_argument("-f", dest="flannel_env", default=DEFAULT_SUBNET_FILE,
                        help=f"path to flannel env file (default {DEFAULT_SUBNET_FILE})")
    parser.add_argument("-d", dest="docker_env", default=DEFAULT_DOCKER_ENV,
                        help=f"path to Docker env file to write to (default {DEFAULT_DOCKER_ENV})")
    parser.add_argument("-i", dest="individual", action="store_true",
                        help="output each Docker option as individual var, e.g. DOCKER_OPT_MTU")
    parser.add_argument("-c", dest="combined", action="store_true",
                        help="output combined Docker options into the combined key's var")
    parser.add_argument("-k", dest="combined_key", default="DOCKER_OPTS",
                        help="set the combined options key (default DOCKER_OPTS)")
    parser.add_argument("-m", dest="ip_masq", action="store_false",
                        help="do not output --ip-masq (useful for older Docker version)")
    args = parser.parse_args(argv)
    try:
        flannel = read_variables(args.flannel_env)
    except FileNotFoundError:
        # The script goes on without it (and writes an empty option set); say so.
        print(f"pyflannel-docker-opts: {args.flannel_env} not found: no flannel options",
              file=sys.stderr)
        flannel = {}
    except OSError as err:
        print(f"pyflannel-docker-opts: cannot read {args.flannel_env}: {err}", file=sys.stderr)
        return 1
    individual, combined = args.individual, args.combined
    if not individual and not combined:
        individual = combined = True
    text = render(docker_options(flannel, os.environ, args.ip_masq), args.combined_key,
                  os.environ, individual, combined)
    with open(args.docker_env, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
