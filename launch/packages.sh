# Sourced by the local-cluster scripts: `install_packages "BIN ..." PACKAGE ...` installs the Debian PACKAGEs when any
# BIN is missing (as root, with apt-get), else stops with a line saying what to install. Needs die() defined.
install_packages() {
    local bins=$1 missing=() bin
    shift
    for bin in $bins; do
        PATH=$PATH:/usr/sbin command -v "$bin" >/dev/null || missing+=("$bin")
    done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "${missing[*]} not installed; as root: apt-get install $*"
    command -v apt-get >/dev/null || die "${missing[*]} not installed and no apt-get; install $* or their equivalents"
    echo "installing $*" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
