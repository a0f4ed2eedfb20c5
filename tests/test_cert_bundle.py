"""``usher cert bundle``: a host's LNM files made on the controller, through
the real ``usher`` command; the LNM started with them attaches to a real
controller over TLS."""

import os
import stat
import subprocess
import tarfile

import pytest

from tests.realsite import SOURCE_PROGRAMS, Site, run
from usher import pki, settings
from usher.config import load_config


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def site(tmp_path):
    box = Site(tmp_path / "site", SOURCE_PROGRAMS)
    yield box
    box.stop()


def test_bundle_into_a_directory_is_what_lnm_config_expects(site, tmp_path):
    out = tmp_path / "vmm47"
    result = run(SOURCE_PROGRAMS, "usher", "cert", "bundle", "--lnm", "vmm47", "--dir",
                 str(site.etc), "--controller-host", "ctrl.example.org", "--out", str(out))
    assert "Made the bundle of LNM vmm47" in result.stdout
    assert "set libvirt_uri in /etc/usher/lnm.config" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "ca_cert.pem", "lnm.config", "usherlnm_cert.pem", "usherlnm_key.pem"]
    assert _mode(out) == 0o700 and _mode(out / "usherlnm_key.pem") == 0o600
    assert (out / "ca_cert.pem").read_bytes() == (site.etc / "ca_cert.pem").read_bytes()
    identity = pki.certificate_identity(pki.load_certificate(out / "usherlnm_cert.pem"))
    assert (identity.name, identity.role) == ("vmm47", "lnm")

    # The real settings loader: the bundle names the files where the
    # defaults (and every document) put them.
    lnm = load_config(settings.LNM, [str(out / "lnm.config")], isolated=True)["lnm"]
    assert (lnm["name"], lnm["controller_host"], lnm["controller_port"]) == (
        "vmm47", "ctrl.example.org", 7391)
    assert (lnm["ssl_cert_file"], lnm["ssl_key_file"], lnm["ssl_ca_file"]) == (
        "/etc/usher/usherlnm_cert.pem", "/etc/usher/usherlnm_key.pem", "/etc/usher/ca_cert.pem")
    defaults = load_config(settings.LNM, [], isolated=True)["lnm"]
    assert (defaults["ssl_cert_file"], defaults["ssl_key_file"], defaults["ssl_ca_file"]) == (
        lnm["ssl_cert_file"], lnm["ssl_key_file"], lnm["ssl_ca_file"])
    # libvirt_uri left for the administrator: the LNM refuses until it is set.
    assert lnm["libvirt_uri"] is None and not lnm["test_host"]
    refused = run(SOURCE_PROGRAMS, "usherlnm", "--isolated", "--config",
                  str(out / "lnm.config"), check=False)
    assert refused.returncode == 2 and "libvirt_uri is not set" in refused.stderr

    again = run(SOURCE_PROGRAMS, "usher", "cert", "bundle", "--lnm", "vmm47", "--dir",
                str(site.etc), "--out", str(out), check=False)
    assert again.returncode == 1 and "already holds" in again.stderr


def test_bundle_into_a_tar_file_keeps_the_modes(site, tmp_path):
    target = tmp_path / "vmm48.tar"
    run(SOURCE_PROGRAMS, "usher", "cert", "bundle", "--lnm", "vmm48", "--dir", str(site.etc),
        "--controller-host", "10.0.0.1", "--libvirt-uri", "qemu:///system", "--tar",
        str(target))
    assert _mode(target) == 0o600
    with tarfile.open(target) as tar:
        members = {m.name: m.mode for m in tar.getmembers()}
    assert members == {"usherlnm_cert.pem": 0o644, "usherlnm_key.pem": 0o600,
                       "ca_cert.pem": 0o644, "lnm.config": 0o644}
    host_etc = tmp_path / "host-etc"
    host_etc.mkdir()
    subprocess.run(["tar", "-xf", str(target), "-C", str(host_etc)], check=True)
    assert _mode(host_etc / "usherlnm_key.pem") == 0o600
    lnm = load_config(settings.LNM, [str(host_etc / "lnm.config")], isolated=True)["lnm"]
    assert (lnm["libvirt_uri"], lnm["controller_host"]) == ("qemu:///system", "10.0.0.1")


@pytest.mark.parametrize("args, complaint", [
    (["--out", "x", "--libvirt-uri", "qemu:///system\nname = other"], "not a libvirt URI"),
    (["--out", "x", "--controller-host", "bad host"], "not a host name"),
    (["--out", "x", "--host-dir", "etc/usher"], "an absolute path"),
    (["--out", "x", "--tar", "y.tar"], "not allowed with argument"),
    (["--out", "x", "--lnm", "bad name"], "invalid"),
    ([], "one of the arguments --out --tar is required"),
])
def test_bundle_refuses_bad_arguments_and_writes_nothing(site, tmp_path, args, complaint):
    result = subprocess.run(SOURCE_PROGRAMS["usher"] + [
        "cert", "bundle", "--lnm", "vmm9", "--dir", str(site.etc), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode in (1, 2) and complaint in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.tar").exists()


def test_bundle_refuses_a_directory_others_may_read(site, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    result = run(SOURCE_PROGRAMS, "usher", "cert", "bundle", "--lnm", "vmm9", "--dir",
                 str(site.etc), "--out", str(shared), check=False)
    assert result.returncode == 1 and "others may read it" in result.stderr
    assert list(shared.iterdir()) == []


def test_bundle_refuses_a_directory_of_another_user_or_a_link(site, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)          # nobody's (the tests run as root)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(mine)
    for out, complaint in ((theirs, "belongs to another user"),
                           (link, "is a symbolic link")):
        result = run(SOURCE_PROGRAMS, "usher", "cert", "bundle", "--lnm", "vmm9", "--dir",
                     str(site.etc), "--out", str(out), check=False)
        assert result.returncode == 1 and complaint in result.stderr
    assert list(theirs.iterdir()) == [] and list(mine.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "mine", "site", "theirs"]


def test_a_new_out_directory_is_made_whole_with_mode_700(site, tmp_path):
    out = tmp_path / "new" / "vmm9"
    run(SOURCE_PROGRAMS, "usher", "cert", "bundle", "--lnm", "vmm9", "--dir", str(site.etc),
        "--out", str(out))
    assert _mode(out) == 0o700 and out.stat().st_uid == os.geteuid()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ("usherlnm_cert.pem", "usherlnm_key.pem", "ca_cert.pem", "lnm.config"))
    assert [p.name for p in out.parent.iterdir()] == ["vmm9"]     # no temporary left


def test_a_bundled_lnm_attaches_to_the_controller_over_tls(site, tmp_path):
    site.start_controller()
    out = tmp_path / "host"
    site.bundle("vmm47", out, "--libvirt-uri", "test:///default")
    site.start("usherlnm", out / "lnm.config", site.local_settings("vmm47"))
    lnm = site.wait_attached("vmm47")
    # test:///default, named explicitly, is a test host, and marked as one.
    assert lnm["test_host"] is True
    table = site.ush("list_lnm").stdout
    assert "vmm47" in table and "TEST" in table
