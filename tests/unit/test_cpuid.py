"""The CPUID we give guests: masked for the PVM emulator, untouched on hardware KVM."""

from pytest_supermachine.vmm.cpuid import CpuidEntry, CpuidTable

XSAVE, AVX, CX16, TSC_DEADLINE = 1 << 26, 1 << 28, 1 << 13, 1 << 24


def table() -> CpuidTable:
    return CpuidTable(
        [
            CpuidEntry(0, 0, 0, 0xD, 0x68747541, 0x444D4163, 0x69746E65),
            CpuidEntry(1, 0, 0, 0x00A00F11, 0, XSAVE | AVX | CX16 | 1, 0x178BFBFF),
            CpuidEntry(7, 0, 1, 0, (1 << 5) | (1 << 9), 0, 0),
            CpuidEntry(0xD, 0, 1, 7, 0x340, 0x340, 0),
            CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0, 0),
        ]
    )


def test_pvm_hides_xsave_avx_and_cmpxchg16b():
    leaf1 = table().for_guest(pvm=True).find(1)
    assert leaf1.ecx & (XSAVE | AVX | CX16) == 0
    assert leaf1.ecx & 1  # SSE3 untouched


def test_pvm_advertises_tsc_deadline_and_xsaveerptr():
    t = table().for_guest(pvm=True)
    assert t.find(1).ecx & TSC_DEADLINE
    assert t.find(0x80000008).ebx & (1 << 2)


def test_pvm_empties_the_xsave_leaf_and_hides_avx2_and_erms():
    t = table().for_guest(pvm=True)
    assert (t.find(0xD).eax, t.find(0xD).ebx) == (0, 0)
    assert t.find(7).ebx == 0  # AVX2 (bit 5) and ERMS (bit 9): rep stosb is emulated per byte


def test_hardware_kvm_gets_the_full_table():
    assert table().for_guest(pvm=False).entries == table().entries


def test_each_vcpu_sees_its_own_apic_id():
    t = table().for_vcpu(3, 4)
    assert t.find(1).ebx >> 24 == 3
    assert (t.find(1).ebx >> 16) & 0xFF == 4


def test_vendor_and_signature_are_decoded():
    t = table()
    assert t.vendor() == "AuthenticAMD"
    assert t.signature() == (25, 1, 1)


def test_cpuid_round_trips_through_kvm_bytes():
    t = table()
    assert CpuidTable.from_bytes(t.to_bytes()).entries == t.entries
