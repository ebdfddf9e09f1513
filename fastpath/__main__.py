"""`python -m fastpath`: which kernel features the fast path found, without starting anything.
Exits 0 when the offloaded path can run in full, 1 when it would fall back for some of it."""

import sys

from fastpath.device import kernel_features


def main() -> int:
    try:
        features = kernel_features()
    except OSError as err:
        print(f"cannot probe: {err} (opening a TUN needs CAP_NET_ADMIN)", file=sys.stderr)
        return 2
    for name, found in features.items():
        print(f"{'yes' if found else 'no ':3}  {name}")
    return 0 if all(features.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
