# Shared setup steps for scripts/run and scripts/test (sourced, not run).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"

# mitmproxy 12 needs Python 3.12+. Debian 12's python3 is 3.11, so look for a
# newer one: on PATH first, then under pyenv.
find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    local root
    root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    for candidate in $(ls -d "$root"/versions/3.1[3-9]* "$root"/versions/3.12* 2>/dev/null | sort -rV); do
        if [ -x "$candidate/bin/python3" ] &&
            "$candidate/bin/python3" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            echo "$candidate/bin/python3"
            return 0
        fi
    done
    echo "error: hub-rewrite needs Python 3.12 or newer (mitmproxy 12); none found on PATH or under pyenv" >&2
    return 1
}

# What .venv was installed from: the dependencies (pyproject.toml) and the
# Python running it. Kept in $VENV_STAMP with the extras installed, so a
# restart with nothing changed skips pip (an editable install builds in its
# own environment from the package index: seconds, and no start at all where
# the index is out of reach).
VENV_STAMP="$VENV/.hub-rewrite-installed"

venv_key() {
    { cat "$REPO_ROOT/pyproject.toml"; "$VENV/bin/python" -c 'import sys; print(sys.version)'; } |
        sha256sum | cut -d' ' -f1
}

# $1 = extras: true when the stamp matches and holds those extras ("" is in every install)
venv_up_to_date() {
    local extras="$1" key="" installed=""
    [ -f "$VENV_STAMP" ] || return 1
    { read -r key && read -r installed; } <"$VENV_STAMP" || return 1
    [ "$key" = "$(venv_key)" ] && { [ -z "$extras" ] || [ "$extras" = "$installed" ]; }
}

write_venv_stamp() {
    printf '%s\n%s\n' "$(venv_key)" "$1" >"$VENV_STAMP.tmp"
    mv -f "$VENV_STAMP.tmp" "$VENV_STAMP"
}

# .venv with mitmproxy and the addon's dependencies; $1 = extras ("" or "test").
# Installs only when .venv is missing, its Python changed or pyproject.toml did.
ensure_venv() {
    local extras="${1:-}"
    if [ ! -x "$VENV/bin/python" ] ||
        ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        local python
        python="$(find_python)"
        echo "setup: creating .venv with $python" >&2
        rm -rf "$VENV"
        "$python" -m venv "$VENV"
    fi
    venv_up_to_date "$extras" && return 0
    local spec="$REPO_ROOT"
    [ -n "$extras" ] && spec="$REPO_ROOT[$extras]"
    echo "setup: installing hub-rewrite${extras:+[$extras]} and its dependencies into .venv" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
    write_venv_stamp "$extras"
}

# Debian packages, installed only when missing (without recommends: docker.io
# would otherwise pull in half a desktop's worth of tools).
ensure_debian_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
