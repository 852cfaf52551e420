#!/usr/bin/env bash
# Installs Mesa's software Vulkan driver (lavapipe) where it is missing and checks that a Vulkan
# device is there: the wgpu tests run on it. Without it wgpu would fall back to OpenGL, which the
# server refuses.
set -euo pipefail
if ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null
fi
ls /usr/share/vulkan/icd.d/lvp_icd.*.json
