#!/bin/sh
# Install Usher's service files and sample configuration files.
#
# Usage: install.sh [--prefix DIR] [--systemd|--sysv] [--bindir DIR] [ctrl|lnm|plusher|web|batchd|all]
#
#   ctrl          the controller, usherctrl
#   lnm           the local node manager, usherlnm
#   plusher       plusher, the XML-RPC gateway for Plush
#   web           usherweb, the web interface and REST API
#   batchd        usherbatchd, the batch policy daemon (RRC-KI)
#   all           ctrl and lnm, and the ush client's sample ush.config.orig
#                 (the default). plusher, web and batchd are left out: only sites
#                 that use them run them, so they are installed only when named.
#   --systemd     install DIR/etc/systemd/system/<program>.service (mode 644)
#   --sysv        install DIR/etc/init.d/<program> (mode 755)
#                 (default: --systemd when systemd is running, else --sysv)
#   --prefix DIR  install under DIR instead of / (DIR must exist)
#   --bindir DIR  where the usherctrl/usherlnm/plusher/usherweb programs are (default
#                 /usr/local/bin, where setup.py/pip put them on Debian);
#                 written into the installed unit or init script
#
# Sample configurations go to DIR/etc/usher/<x>.config.orig (replacing an
# older sample). A configuration in use (<x>.config) is never created,
# changed or removed: as the Usher documentation says, copy the .orig and
# edit it. Service files are replaced. Nothing is enabled or started; the
# next steps are printed at the end.
#
# Works from the source tree (initscripts/ next to etc/) and from an
# installed share/usher (initscripts/ next to etc/ there too).

PROG=install.sh
DEFAULT_BINDIR=/usr/local/bin

usage() {
    echo "Usage: $PROG [--prefix DIR] [--systemd|--sysv] [--bindir DIR] [ctrl|lnm|plusher|web|batchd|all]"
}

die() {
    echo "$PROG: $1" >&2
    exit 2
}

prefix=/
init_system=
bindir=$DEFAULT_BINDIR
component=

while [ $# -gt 0 ]; do
    case $1 in
        --prefix | --bindir)
            [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a directory"
            if [ "$1" = --prefix ]; then prefix=$2; else bindir=$2; fi
            shift 2
            ;;
        --prefix=* | --bindir=*)
            value=${1#*=}
            [ -n "$value" ] || die "${1%%=*} needs a directory"
            case $1 in --prefix=*) prefix=$value ;; *) bindir=$value ;; esac
            shift
            ;;
        --systemd | --sysv)
            chosen=${1#--}
            if [ -n "$init_system" ] && [ "$init_system" != "$chosen" ]; then
                die "choose one of --systemd and --sysv"
            fi
            init_system=$chosen
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        ctrl | lnm | plusher | web | batchd | all)
            [ -z "$component" ] || die "name one of ctrl, lnm, plusher, web, batchd, all (got '$component' and '$1')"
            component=$1
            shift
            ;;
        *)
            usage >&2
            die "unknown argument '$1'"
            ;;
    esac
done
component=${component:-all}

case $prefix in
    /*) ;;
    *) die "--prefix must be an absolute path, not '$prefix'" ;;
esac
[ -d "$prefix" ] || die "--prefix $prefix is not an existing directory"
# The path goes into sed replacements and unit files: keep it plain.
case $bindir in
    /*) ;;
    *) die "--bindir must be an absolute path, not '$bindir'" ;;
esac
case $bindir in
    *[!A-Za-z0-9_./+@-]*) die "--bindir '$bindir' has characters other than letters, digits and _ . / + @ -" ;;
esac
bindir=${bindir%/}
bindir=${bindir:-/}

if [ -z "$init_system" ]; then
    # systemd's own test (sd_booted): this directory exists only under systemd.
    if [ -d /run/systemd/system ]; then init_system=systemd; else init_system=sysv; fi
fi

here=$(cd "$(dirname "$0")" && pwd) || die "cannot find the directory of $0"
samples=$(cd "$here/../etc" 2>/dev/null && pwd) || die "no sample configurations: $here/../etc is missing"

case $component in
    all) names="ctrl lnm" ;;
    *) names=$component ;;
esac

# The program, init script and unit name of component $1.
program_of() {
    case $1 in
        plusher) echo plusher ;;
        web) echo usherweb ;;
        batchd) echo usherbatchd ;;
        *) echo "usher$1" ;;
    esac
}

# Check every source before changing anything.
sample_files=
for name in $names; do
    sample_files="$sample_files $name.config.orig"
done
if [ "$component" = all ]; then
    sample_files="$sample_files ush.config.orig"
fi
for file in $sample_files; do
    [ -f "$samples/$file" ] || die "missing sample configuration $samples/$file"
done
for name in $names; do
    if [ "$init_system" = systemd ]; then
        service_file=$(program_of "$name").service
    else
        service_file=$(program_of "$name")
    fi
    [ -f "$here/$service_file" ] || die "missing $here/$service_file"
done

root=${prefix%/}
etc_usher=$root/etc/usher
if [ "$init_system" = systemd ]; then
    service_dir=$root/etc/systemd/system
else
    service_dir=$root/etc/init.d
fi

# Copies $1 to $2 with mode $3 through a temporary file, so that the target
# is never seen half-written.
put() {
    tmp="$2.install.$$"
    if cp "$1" "$tmp" && chmod "$3" "$tmp" && mv -f "$tmp" "$2"; then
        return 0
    fi
    rm -f "$tmp"
    echo "$PROG: could not install $2" >&2
    exit 1
}

mkdir -p "$etc_usher" "$service_dir" || exit 1

for file in $sample_files; do
    put "$samples/$file" "$etc_usher/$file" 644
    echo "installed $etc_usher/$file"
done

for name in $names; do
    daemon=$(program_of "$name")
    if [ "$init_system" = systemd ]; then
        source_file=$here/$daemon.service
        target=$service_dir/$daemon.service
        mode=644
        pattern="s|^ExecStart=$DEFAULT_BINDIR/$daemon |ExecStart=$bindir/$daemon |"
    else
        source_file=$here/$daemon
        target=$service_dir/$daemon
        mode=755
        pattern="s|^DAEMON=$DEFAULT_BINDIR/$daemon\$|DAEMON=$bindir/$daemon|"
    fi
    edited="$target.edit.$$"
    sed "$pattern" "$source_file" >"$edited" || { rm -f "$edited"; exit 1; }
    put "$edited" "$target" "$mode"
    rm -f "$edited"
    echo "installed $target"
done

echo
for name in $names; do
    daemon=$(program_of "$name")
    if [ ! -x "$bindir/$daemon" ]; then
        echo "warning: $bindir/$daemon does not exist yet; install Usher (pip install .) or"
        echo "         rerun with --bindir \"\$(dirname \"\$(command -v $daemon)\")\""
    fi
done

step=1
echo "Next steps:"
for name in $names; do
    if [ -f "$etc_usher/$name.config" ]; then
        echo "  $step. Check $etc_usher/$name.config (kept as it was) against the new $name.config.orig."
    else
        echo "  $step. Configure: cp $etc_usher/$name.config.orig $etc_usher/$name.config"
        echo "     and edit it; every option is explained in the file."
    fi
    step=$((step + 1))
done
echo "  $step. Once per site, on the controller host, create the certificate authority:"
echo "       usher ca init            (ca_cert.pem and ca_key.pem in /etc/usher)"
step=$((step + 1))
echo "  $step. Issue certificates with the CA:"
case " $names " in *" ctrl "*)
    echo "       controller: usher cert issue --controller usherctrl --hostname <controller's DNS name>"
    echo "                   (usherctrl_cert.pem/_key.pem, the names ctrl.config expects);"
    echo "                   list the LNMs' names in ctrl.config's lnm_names (empty: none may attach)"
esac
case " $names " in *" lnm "*)
    echo "       each node:  usher cert issue --lnm <node name> --out <dir>   (the CN is the node's name)"
    echo "                   then copy <node name>_cert.pem and _key.pem to the node as"
    echo "                   /etc/usher/usherlnm_cert.pem and usherlnm_key.pem, with ca_cert.pem"
esac
case " $names " in *" plusher "*)
    echo "       plusher:    needs the CA's ca_cert.pem in /etc/usher (ssl_ca_file) to check the"
    echo "                   controller. By default it serves plain HTTP on 127.0.0.1:7393; for Plush"
    echo "                   on another host serve HTTPS: usher cert issue --gateway plusher --hostname <its DNS name>"
    echo "                   then set ssl_cert_file and ssl_key_file in plusher.config"
esac
case " $names " in *" batchd "*)
    echo "       usherbatchd: logs in as an administrator account (username in batchd.config, its"
    echo "                   password alone in password_file, mode 600); needs ca_cert.pem (ssl_ca_file);"
    echo "                   create queue_dir (users write new/ and cancel/: mode 1733) and state_dir"
esac
case " $names " in *" web "*)
    echo "       usherweb:   serves HTTPS only: usher cert issue --gateway usherweb --hostname <its DNS name>"
    echo "                   then set ssl_cert_file/ssl_key_file (and gateway_cert_file/gateway_key_file,"
    echo "                   the same files) in web.config; it needs the CA's ca_cert.pem (ssl_ca_file)"
esac
step=$((step + 1))
daemons=
for name in $names; do daemons="$daemons $(program_of "$name")"; done
if [ "$init_system" = systemd ]; then
    echo "  $step. Enable and start (the controller first):"
    echo "       systemctl daemon-reload && systemctl enable --now$daemons"
else
    echo "  $step. Enable at boot and start (the controller first):"
    for daemon in $daemons; do
        echo "       update-rc.d $daemon defaults   (Red Hat: chkconfig --add $daemon)"
        echo "       /etc/init.d/$daemon start"
    done
fi
exit 0
