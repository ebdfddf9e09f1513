"""Host plumbing: rtnetlink, the external interface, iptables rules and subnet.env (flannel's
pkg/ip and pkg/iptables)."""
