"""perf/profile.py's stage shares, from made-up `perf script` call stacks (no recording)."""

from perf.profile import stage_shares

SCRIPT = """iperf3 27893 [000] 81426.406876:     250000 cpu-clock:
\tffffffff820593d8 inet_gso_segment+0x158 ([kernel.kallsyms])
\tffffffff81eaf546 __skb_gso_segment+0x76 ([kernel.kallsyms])
\tffffffff81ea073d skb_do_redirect+0x8dd ([kernel.kallsyms])
\tffffffff81ea073d skb_do_redirect+0x8dd ([kernel.kallsyms])

iperf3 27893 [001] 81426.406877:     250000 cpu-clock:
\tffffffffc0001234 bpf_prog_4f0483a0ad96c593_tun_egress+0x40 ([kernel.kallsyms])
\tffffffff81e6585d __dev_queue_xmit+0x1ed ([kernel.kallsyms])

swapper     0 [000] 81426.406878:     250000 cpu-clock:
\tffffffff81001000 pv_native_safe_halt+0x5 ([kernel.kallsyms])

iperf3 27886 [001] 81426.438999:     250000 cpu-clock:
\tffffffff81000000 _copy_to_iter+0x10 ([kernel.kallsyms])
\t           f8350 __GI___libc_read+0x10 (/usr/lib/x86_64-linux-gnu/libc.so.6)
"""


def test_each_sample_counts_once_in_every_stage_its_stack_passes() -> None:
    shares = stage_shares(SCRIPT)
    # skb_do_redirect twice in one stack is one sample of four.
    assert shares["bpf_redirect to the underlay (skb_do_redirect)"] == 25.0
    assert shares["GSO header checks of a device's transmit (__skb_gso_segment)"] == 25.0
    assert shares["pyflannel's tc programs"] == 25.0
    assert shares["payload copies"] == 25.0
    assert shares["kernel VXLAN send (vxlan_xmit)"] == 0.0


def test_no_samples_no_shares() -> None:
    assert set(stage_shares("").values()) == {0.0}
