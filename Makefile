# pyflannel. `make test` and `make demo` install what they need first: Debian packages, the
# venv in .venv/ with the package (editable, Cython built in place) and the test tools.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What pyflanneld and the tests drive: ip, ping, iptables, a real etcd and etcdctl, the CNI plugins,
# iperf3, qperf and ethtool (make perf's wire regime); linux-perf for `make profile`; clang and
# libbpf's headers build the kernel path's tc programs, libbpf1 loads them, bpftool reads their
# programs, links and maps back in tests/test_kernel_path.py; curl and systemd
# (systemd-analyze, systemctl) for the README's metrics and systemd blocks (tests/test_readme.py);
# openssl makes the tests' CAs and certificates (tests/etcd.py, tests/kubeapi.py). kubectl comes
# from Debian's kubernetes-client only where no kubectl is installed: it would clash over
# /usr/bin/kubectl with the Cloud SDK's `kubectl` package that some machines carry.
# The guests on Debian 12's Linux 6.1 (tests/guests.py, docs/guests.md): QEMU, and busybox-static
# and kmod for virtme-ng's initramfs and the guests' modules.
DEB_PACKAGES := iproute2 iputils-ping iptables etcd-server etcd-client containernetworking-plugins \
	iperf3 qperf ethtool linux-perf clang libbpf-dev libbpf1 bpftool curl systemd openssl \
	qemu-system-x86 busybox-static kmod
# The guests' kernel: Debian 12's newest generic linux-image-6.1.0-*-amd64 (9p as a module),
# unpacked here and never installed (its postinst would run depmod, linux-update-symlinks and
# /etc/kernel/postinst.d's initramfs and grub hooks on this machine).
GUEST_KERNELS := /var/cache/pyflannel
STAMP := $(VENV)/.installed
SOURCES := setup.py pyproject.toml $(wildcard fastpath/*.pyx fastpath/*.pxd fastpath/*.py fastpath/*.bpf.c)

.PHONY: install deb demo test perf scale leases kube-scale limits profile lint clean wheel

# Compiled to bytecode as a wheel's install does: every daemon start would compile them again
# otherwise (where PYTHONDONTWRITEBYTECODE is set), which a restart's stall would show.
install: deb $(STAMP)
	$(PY) -m compileall -q control fastpath

deb:
	@missing=$$(for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done; command -v kubectl >/dev/null || echo kubernetes-client); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@ls $(GUEST_KERNELS)/linux-image-6.1.*/boot/vmlinuz-6.1.* >/dev/null 2>&1 || { \
		newest() { apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$$' | \
			cut -d' ' -f1 | sort -V | tail -n1; }; \
		package=$$(newest); [ -n "$$package" ] || { apt-get update -q && package=$$(newest); }; \
		[ -n "$$package" ] || { echo "apt knows no linux-image-6.1.0-*-amd64" >&2; exit 1; }; \
		echo "unpacking $$package into $(GUEST_KERNELS)/$$package"; \
		rm -rf $(GUEST_KERNELS)/download $(GUEST_KERNELS)/$$package.new && \
		mkdir -p $(GUEST_KERNELS)/download && \
		(cd $(GUEST_KERNELS)/download && apt-get download -q -o APT::Sandbox::User=root $$package) && \
		dpkg-deb -x $(GUEST_KERNELS)/download/$${package}_*.deb $(GUEST_KERNELS)/$$package.new && \
		depmod -b $(GUEST_KERNELS)/$$package.new $${package#linux-image-} && \
		mv $(GUEST_KERNELS)/$$package.new $(GUEST_KERNELS)/$$package && \
		rm -rf $(GUEST_KERNELS)/download; }

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

# A three-host cluster in namespaces with traffic across it; API=v2 for the etcd v2 API,
# BACKEND=vxlan or host-gw for those backends; SUBNET_MGR=kube for the subnets in Kubernetes
# (the real kube-apiserver and controller manager v1.19.0 of ../shared/reference/, and
# pyflanneld --kube-subnet-mgr under deploy/kube-pyflannel.yml's ClusterRole); IPV6=dual for a
# dual-stack network, IPV6=only for IPv6 alone.
API ?= v3
BACKEND ?=
SUBNET_MGR ?= etcd
IPV6 ?= none
demo: install
	$(PY) -m tests.demo --etcd-api $(API) $(if $(BACKEND),--backend $(BACKEND)) \
		--subnet-mgr $(SUBNET_MGR) --ipv6 $(IPV6)

# The paper's Table 1 side by side, in three regimes (about an hour); QUICK=1 for one short
# pass (about 5). FLANNELD=path adds flanneld's own udp and vxlan rows (default: the reference
# build beside the repository, when there is one; FLANNELD= leaves them out).
QUICK ?=
FLANNELD ?= $(wildcard $(abspath $(CURDIR)/../shared/reference/flanneld-v0.20.2))
perf: install
	$(PY) -m perf.bench $(if $(QUICK),--quick) --flanneld '$(FLANNELD)'

# HOSTS pyflanneld hosts started at once on one etcd: lease and route times, duplicates, CPU,
# RSS and etcd's request rate at steady state (a Markdown table for perf/SCALE.md).
HOSTS ?= 100
scale: install
	$(PY) -m perf.scale --hosts $(HOSTS)

# LEASES leases written straight into etcd beside real hosts: a joining daemon's start-up, CPU
# under 100 lease changes per second, TCP against a 2-lease cluster (perf/SCALE.md); API=v2 too.
LEASES ?= 10000
leases: install
	$(PY) -m perf.leases --leases $(LEASES) --api $(API)

# NODES Nodes in a real API server (tests/kubeapi.py; 5,000 is Kubernetes' supported maximum), a
# few of them real hosts: a joining pyflanneld's start-up and peak RSS, CPU under 100 Node changes
# per second, a new Node's time to its route, beside flanneld v0.20.2 as kube-flannel.yml runs it
# and past its EVENT_QUEUE_DEPTH (perf/SCALE.md). NODES=500 for a quick pass (about 5 minutes).
NODES ?= 5000
kube-scale: install
	$(PY) -m perf.kubescale --nodes $(NODES) --flanneld '$(FLANNELD)'

# Each daemon inside flannel's DaemonSet limits (memory 50Mi, cpu 100m, in cgroups), beside
# flanneld's: TCP, CPU throttling, charged memory (BPF maps included), OOM kills, with a warm and
# a cold page cache (docs/daemonset-limits.md; about 15 minutes).
limits: install
	$(PY) -m perf.limits --out perf/quick/limits.json --flanneld '$(FLANNELD)'

# Where one TCP stream and four spend the machine over pyflannel and over kernel VXLAN
# (perf/PROFILE.md).
profile: install
	$(PY) -m perf.profile

# The sdist and a manylinux wheel (auditwheel; see the README) into $(DIST). The wheel is built
# in an isolated environment from PyPI's setuptools and Cython, not from the venv's.
DIST ?= dist
wheel: install
	rm -rf build/wheel $(DIST)/pyflannel-*
	$(PY) -m build --sdist --outdir $(DIST) .
	$(PY) -m build --wheel --outdir build/wheel .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair --wheel-dir $(DIST) \
		build/wheel/pyflannel-*.whl

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build dist *.egg-info $(filter-out %.bpf.c,$(wildcard fastpath/*.c)) fastpath/*.so fastpath/*.bpf.o
