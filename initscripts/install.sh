#!/bin/sh
# Install Usher on a Debian 12 host, for the roles it plays. See usage() below
# (install.sh --help) for what it does and writes.

PROG=install.sh
ROLES="ctrl lnm client plusher web batchd"
# Debian packages every role needs: a virtualenv, and what pip needs to build
# libvirt-python (which has no wheels). An LNM also needs libvirt's daemon.
APT_COMMON="python3 python3-venv python3-dev gcc pkg-config libvirt-dev"
APT_LNM="libvirt-daemon-system"

usage() {
    cat <<'EOF'
Usage: sh install.sh [OPTIONS] ROLE...

Installs Usher for the roles this host plays, on Debian 12 (bookworm):

  ctrl     the controller: usherctrl, with usher (administration: CA,
           certificates, users, host bundles) and ush (the shell)
  lnm      a host's local node manager: usherlnm (and libvirt's daemon)
  client   ush, the shell, only
  plusher  plusher, the XML-RPC gateway for Plush
  web      usherweb, the web interface and REST API
  batchd   usherbatchd, the batch policy daemon, and usher-batch

What it does, in order:
  1. as root on this machine: installs the Debian packages it needs with
     apt-get (python3-venv, python3-dev, gcc, pkg-config, libvirt-dev; for
     lnm also libvirt-daemon-system). Skipped with --no-apt or --root.
  2. creates the virtualenv VENV (default /opt/usher) unless it exists, and
     pip-installs Usher into it from SOURCE (default: the source tree this
     script is in). Debian's own Python stays untouched.
  3. links the role's programs into BINDIR (default /usr/local/bin):
     BINDIR/usherctrl -> VENV/bin/usherctrl ...
  4. installs the daemons' systemd units (/etc/systemd/system/NAME.service)
     or SysV init scripts (/etc/init.d/NAME), naming VENV/bin/NAME.
  5. installs the sample configurations /etc/usher/ROLE.config.orig (mode
     644). A configuration in use (/etc/usher/ROLE.config) is never created,
     changed or removed.
Nothing is enabled or started; the next steps are printed at the end.
Running it again upgrades Usher in VENV and replaces links, units and samples.

Options:
  --venv DIR     the virtualenv (default /opt/usher; with --root, ROOT/opt/usher)
  --bindir DIR   where the programs are linked (default /usr/local/bin; with
                 --root, ROOT/usr/local/bin)
  --root DIR     install into DIR instead of /: a throwaway root for tests, or a
                 staging root. Every file goes under DIR (--venv and --bindir
                 must be inside it), nothing outside; no apt-get. The units name
                 the programs by their paths under DIR.
  --source SRC   what pip installs: a source tree, a wheel or an sdist (default:
                 the tree this script is in)
  --no-apt       do not run apt-get (the packages above must be installed)
  --systemd      install systemd units (the default when systemd runs)
  --sysv         install SysV init scripts instead
  -h, --help     this text

Examples:
  sh initscripts/install.sh ctrl            # on the controller
  sh initscripts/install.sh lnm             # on every hypervisor host
  sh initscripts/install.sh client          # where users run ush
  sh initscripts/install.sh --root /tmp/r --no-apt ctrl lnm   # a trial into /tmp/r

Exit status: 0 when installed, 2 for a usage error (nothing changed), 1 when
a step failed (the message says which).
EOF
}

die() {
    echo "$PROG: $1" >&2
    exit 2
}

fail() {
    echo "$PROG: $1" >&2
    exit 1
}

# A path written into units, links and sed replacements: keep it plain.
check_path() {
    case $2 in
        /*) ;;
        *) die "$1 must be an absolute path, not '$2'" ;;
    esac
    case $2 in
        *[!A-Za-z0-9_./+@-]*) die "$1 '$2' has characters other than letters, digits and _ . / + @ -" ;;
    esac
    # No . or .. segment: ROOT/../x would pass the under --root test below.
    case $2/ in
        */./* | */../*) die "$1 '$2' has a . or .. segment: give the path without them" ;;
    esac
}

root=
venv=
bindir=
source_arg=
apt=yes
init_system=
roles=

while [ $# -gt 0 ]; do
    case $1 in
        --root | --prefix | --venv | --bindir | --source)
            [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
            case $1 in
                --root | --prefix) root=$2 ;;
                --venv) venv=$2 ;;
                --bindir) bindir=$2 ;;
                --source) source_arg=$2 ;;
            esac
            shift 2
            ;;
        --root=* | --prefix=* | --venv=* | --bindir=* | --source=*)
            value=${1#*=}
            [ -n "$value" ] || die "${1%%=*} needs a value"
            case $1 in
                --root=* | --prefix=*) root=$value ;;
                --venv=*) venv=$value ;;
                --bindir=*) bindir=$value ;;
                --source=*) source_arg=$value ;;
            esac
            shift
            ;;
        --no-apt)
            apt=no
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
        -*)
            echo "Usage: sh install.sh [OPTIONS] ROLE...   (roles: $ROLES; --help explains)" >&2
            die "unknown option '$1'"
            ;;
        *)
            # "all" (the old default): the controller and an LNM on one machine.
            case $1 in all) named="ctrl lnm" ;; *) named=$1 ;; esac
            for role in $named; do
                case " $ROLES " in
                    *" $role "*) ;;
                    *) die "unknown role '$role' (roles: $ROLES)" ;;
                esac
                case " $roles " in
                    *" $role "*) ;;
                    *) roles="$roles $role" ;;
                esac
            done
            shift
            ;;
    esac
done
[ -n "$roles" ] || die "name at least one role: $ROLES (install.sh --help explains)"

if [ -n "$root" ]; then
    check_path --root "$root"
    [ -d "$root" ] || die "--root $root is not an existing directory"
    root=$(cd "$root" && pwd -P) || die "cannot enter --root $root"
    [ "$root" = / ] && root=
    apt=no
fi
venv=${venv:-$root/opt/usher}
bindir=${bindir:-$root/usr/local/bin}
check_path --venv "$venv"
check_path --bindir "$bindir"
venv=${venv%/}
bindir=${bindir%/}
if [ -n "$root" ]; then
    for pair in "--venv $venv" "--bindir $bindir"; do
        set -- $pair
        case $2/ in
            "$root"/*) ;;
            *) die "$1 $2 is outside --root $root (everything goes under it)" ;;
        esac
    done
fi

if [ -z "$init_system" ]; then
    # systemd's own test (sd_booted): this directory exists only under systemd.
    if [ -d /run/systemd/system ]; then init_system=systemd; else init_system=sysv; fi
fi

here=$(cd "$(dirname "$0")" && pwd) || fail "cannot find the directory of $0"
samples=$(cd "$here/../etc" 2>/dev/null && pwd) || fail "no sample configurations: $here/../etc is missing"
if [ -n "$source_arg" ]; then
    source=$source_arg
    [ -e "$source" ] || die "--source $source does not exist"
else
    source=$(cd "$here/.." && pwd)
    [ -f "$source/setup.py" ] || die "$source is no Usher source tree: give --source (a tree, wheel or sdist)"
fi

# What each role brings: programs linked into BINDIR, daemons with a unit or
# init script, sample configurations.
programs_of() {
    case $1 in
        ctrl) echo "usherctrl usher ush" ;;
        lnm) echo "usherlnm usher" ;;
        client) echo "ush" ;;
        plusher) echo "plusher" ;;
        web) echo "usherweb" ;;
        batchd) echo "usherbatchd usher-batch" ;;
    esac
}
daemon_of() {
    case $1 in
        ctrl) echo usherctrl ;;
        lnm) echo usherlnm ;;
        plusher) echo plusher ;;
        web) echo usherweb ;;
        batchd) echo usherbatchd ;;
    esac
}
samples_of() {
    case $1 in
        ctrl) echo "ctrl.config.orig ush.config.orig" ;;
        lnm) echo "lnm.config.orig lnm-qemu.config.example" ;;
        client) echo "ush.config.orig" ;;
        *) echo "$1.config.orig" ;;
    esac
}

# Check every source before changing anything.
for role in $roles; do
    for file in $(samples_of "$role"); do
        [ -f "$samples/$file" ] || fail "missing sample configuration $samples/$file"
    done
    daemon=$(daemon_of "$role")
    [ -n "$daemon" ] || continue
    if [ "$init_system" = systemd ]; then file=$here/$daemon.service; else file=$here/$daemon; fi
    [ -f "$file" ] || fail "missing $file"
done
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (it writes /etc, $venv and $bindir), or give --root DIR"
fi

# 1. Debian packages.
if [ "$apt" = yes ]; then
    packages=$APT_COMMON
    case " $roles " in *" lnm "*) packages="$packages $APT_LNM" ;; esac
    echo "installing Debian packages: $packages"
    apt-get update -qq || fail "apt-get update failed"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages \
        || fail "apt-get install failed"
fi

# 2. The virtualenv, and Usher in it.
if [ ! -x "$venv/bin/python" ]; then
    echo "creating the virtualenv $venv"
    mkdir -p "$(dirname "$venv")" || fail "cannot create $(dirname "$venv")"
    python3 -m venv "$venv" || fail "python3 -m venv $venv failed (Debian: apt-get install python3-venv)"
fi
echo "installing Usher from $source into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$source" \
    || fail "pip install into $venv failed (see above)"

root_etc=$root/etc/usher
if [ "$init_system" = systemd ]; then service_dir=$root/etc/systemd/system; else service_dir=$root/etc/init.d; fi
mkdir -p "$bindir" "$root_etc" || fail "cannot create $bindir or $root_etc"

# Copies $1 to $2 with mode $3 through a temporary file, so that the target
# is never seen half-written.
put() {
    tmp="$2.install.$$"
    if cp "$1" "$tmp" && chmod "$3" "$tmp" && mv -f "$tmp" "$2"; then
        return 0
    fi
    rm -f "$tmp"
    fail "could not install $2"
}

# 3. Links.
linked=
for role in $roles; do
    for program in $(programs_of "$role"); do
        case " $linked " in *" $program "*) continue ;; esac
        linked="$linked $program"
        [ -x "$venv/bin/$program" ] || fail "$venv/bin/$program is missing after pip install"
        ln -sfn "$venv/bin/$program" "$bindir/$program" || fail "cannot link $bindir/$program"
        echo "linked $bindir/$program -> $venv/bin/$program"
    done
done

# 4. Units or init scripts.
daemons=
for role in $roles; do
    daemon=$(daemon_of "$role")
    [ -n "$daemon" ] || continue
    daemons="$daemons $daemon"
    mkdir -p "$service_dir" || fail "cannot create $service_dir"
    if [ "$init_system" = systemd ]; then
        source_file=$here/$daemon.service
        target=$service_dir/$daemon.service
        mode=644
        pattern="s|^ExecStart=/opt/usher/bin/$daemon \(.*\) /etc/usher/|ExecStart=$venv/bin/$daemon \1 $root_etc/|"
    else
        source_file=$here/$daemon
        target=$service_dir/$daemon
        mode=755
        pattern="s|^DAEMON=/opt/usher/bin/$daemon\$|DAEMON=$venv/bin/$daemon|; s|^CONFIG=/etc/usher/|CONFIG=$root_etc/|"
    fi
    edited="$target.edit.$$"
    sed "$pattern" "$source_file" >"$edited" || { rm -f "$edited"; fail "cannot write $edited"; }
    put "$edited" "$target" "$mode"
    rm -f "$edited"
    echo "installed $target"
done

# 5. Sample configurations.
for role in $roles; do
    for file in $(samples_of "$role"); do
        put "$samples/$file" "$root_etc/$file" 644
        echo "installed $root_etc/$file"
    done
done

# Next steps: the README's "Installing on real hosts", role by role.
E=$root_etc
echo
echo "Usher $("$venv/bin/python" -c 'import usher; print(usher.__version__)') is installed in $venv. Next steps:"
for role in $roles; do
    case $role in
    ctrl) cat <<EOF
 controller (the README's "Installing on real hosts" explains each step):
   usher ca init --dir $E
   usher cert issue --controller usherctrl --dir $E --hostname CTRL_DNS_NAME
   cp $E/ctrl.config.orig $E/ctrl.config
     and set client_interface, lnm_interface and lnm_names in it
   usher user add NAME --admin --passwd-file $E/passwd
   systemctl daemon-reload && systemctl enable --now usherctrl
   for each host: usher cert bundle --lnm HOST --dir $E --controller-host CTRL_DNS_NAME --tar HOST.tar
     and copy HOST.tar to that host
EOF
    ;;
    lnm) cat <<EOF
 host (LNM):
   tar -xf HOST.tar -C $E      (the bundle from the controller)
   set libvirt_uri in $E/lnm.config (e.g. qemu:///system) unless the bundle has it
   systemctl daemon-reload && systemctl enable --now usherlnm
   then on the controller: ush list_lnm   (the host is listed, connected)
EOF
    ;;
    client) cat <<EOF
 client:
   mkdir -p ~/.usher && cp $E/ush.config.orig ~/.usher/ush.config
   and set controller_host in it; copy the site's ca_cert.pem to $E/ca_cert.pem
EOF
    ;;
    plusher) echo " plusher:  cp $E/plusher.config.orig $E/plusher.config (ssl_ca_file: the site's ca_cert.pem), then systemctl enable --now plusher" ;;
    web) echo " usherweb: usher cert issue --gateway usherweb --hostname \$(hostname -f) on the controller; set the files in $E/web.config (from web.config.orig), then systemctl enable --now usherweb" ;;
    batchd) echo " usherbatchd: cp $E/batchd.config.orig $E/batchd.config (an administrator account, its password_file mode 600, queue_dir, state_dir), then systemctl enable --now usherbatchd" ;;
    esac
done
if [ "$init_system" = sysv ] && [ -n "$daemons" ]; then
    echo " (SysV: instead of systemctl, update-rc.d NAME defaults && /etc/init.d/NAME start)"
fi
exit 0
