"""Building the compiled kernels: a kernel that includes a shared header is rebuilt when the header changes."""

from __future__ import annotations

from memory_mosaics.ops import cpu_extensions


def test_a_header_change_changes_the_flags_of_the_kernels_that_include_it_only(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_extensions, "SOURCES", tmp_path)
    (tmp_path / "shared.h").write_text("inline int one() { return 1; }\n")
    (tmp_path / "with_header.cpp").write_text('#include "shared.h"\nint f() { return one(); }\n')
    (tmp_path / "without.cpp").write_text("int g() { return 2; }\n")
    before = cpu_extensions.headers_flags("with_header.cpp")
    assert len(before) == 1 and before[0].startswith("-DMOSAIC_HEADERS_")
    assert cpu_extensions.headers_flags("without.cpp") == []
    (tmp_path / "shared.h").write_text("inline int one() { return 2 - 1; }\n")
    assert cpu_extensions.headers_flags("with_header.cpp") != before


def test_the_read_kernels_include_the_shared_header():
    for source in ("context_read_cpu.cpp", "persistent_read_cpu.cpp"):
        assert cpu_extensions.headers_flags(source), source
