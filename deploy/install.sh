#!/usr/bin/env bash
# Install edge-inspect on a line PC into its own virtual environment.
#
#   sudo deploy/install.sh            # lean runtime (CPU), from this checkout
#   sudo deploy/install.sh --gpu      # runtime with the CUDA execution provider
#   sudo deploy/install.sh --train    # also the training side (TensorFlow)
#   sudo deploy/install.sh --service  # also the systemd service (edge-inspect serve), enabled
#                                     # and (re)started once its configuration passes the check
#   sudo deploy/install.sh --service --no-venv   # only the service: unit, user, folders, configuration
#   sudo deploy/install.sh --uninstall           # stop and remove the service, the venv and the user;
#                                                # keeps /etc/edge-inspect, /srv/edge-inspect and PREFIX/models
#   sudo deploy/install.sh --uninstall --purge   # remove those too
#   deploy/install.sh --print-unit    # print the service unit for PREFIX; install nothing
#   deploy/install.sh --root DIR ...  # install into DIR as if it were / (an image, a test): no user,
#                                     # no owners, nothing started; the unit is enabled in DIR
#
# The configuration is /etc/edge-inspect/config.toml (deploy/config.example.toml,
# every key explained); an edited one is never overwritten: the new example goes
# beside it as config.toml.new.
#
# Environment: PREFIX (default /opt/edge-inspect), PYTHON (default python3).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${PREFIX:-/opt/edge-inspect}"
python="${PYTHON:-python3}"
extras=""
gpu=0
service=0
venv=1
uninstall=0
purge=0
print_unit=0
root=""
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) gpu=1 ;;
    --train) extras="${extras:+$extras,}train" ;;
    --service) service=1 ;;
    --no-venv) venv=0 ;;
    --uninstall) uninstall=1 ;;
    --purge) purge=1 ;;
    --print-unit) print_unit=1 ;;
    --root) [ $# -ge 2 ] || { echo "Error: --root needs a folder: --root DIR." >&2; exit 2; }
            root="$2"; shift ;;
    --root=*) root="${1#--root=}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "Error: unknown option '$1'. Use --gpu, --train, --service, --no-venv, --uninstall, --purge," \
            "--print-unit or --root DIR (--help says what each does)." >&2; exit 2 ;;
  esac
  shift
done

# The unit as shipped runs /opt/edge-inspect/bin/edge-inspect; point it at PREFIX.
render_unit() {
  sed "s#/opt/edge-inspect/bin/edge-inspect#$prefix/bin/edge-inspect#g" "$here/deploy/edge-inspect.service"
}

if [ "$print_unit" = 1 ]; then
  render_unit
  exit 0
fi

if [ "$purge" = 1 ] && [ "$uninstall" = 0 ]; then
  echo "Error: --purge goes with --uninstall: sudo deploy/install.sh --uninstall --purge." >&2; exit 2
fi
if [ "$uninstall" = 1 ] && { [ "$gpu$service$venv" != 001 ] || [ -n "$extras" ]; }; then
  echo "Error: --uninstall takes only --purge and --root; install and uninstall in separate runs." >&2; exit 2
fi
if [ "$venv" = 0 ] && [ "$service" = 0 ]; then
  echo "Error: --no-venv installs only the service: add --service (the runtime must already be in $prefix)." >&2; exit 2
fi
if [ -n "$root" ]; then
  case "$root" in /*) ;; *) root="$(pwd)/$root" ;; esac
  root="${root%/}"
  [ -d "$root" ] || { echo "Error: --root $root is not a folder. Create it first." >&2; exit 2; }
fi

# Where things go, under --root DIR or not. The unit, the configuration and the
# link name the paths as the running system will see them, without DIR.
unit_dir="$root/etc/systemd/system"
unit="$unit_dir/edge-inspect.service"
dropins="$unit_dir/edge-inspect.service.d"
etc="$root/etc/edge-inspect"
config="$etc/config.toml"
srv="$root/srv/edge-inspect"
cache="$root/var/cache/edge-inspect"
venv_dir="$root$prefix"
link="$root/usr/local/bin/edge-inspect"
user=edge-inspect

# systemctl on this system, or on DIR's unit files (enable and disable only) with --root.
on_system() { [ -z "$root" ]; }
need_systemctl() {
  command -v systemctl >/dev/null || {
    echo "Error: $1 needs systemd, and systemctl is not on this machine. $2" >&2; exit 1; }
}

if [ "$uninstall" = 1 ]; then
  need_systemctl --uninstall "Remove $unit, $venv_dir and the user $user by hand."
  kept=()
  if on_system; then
    if systemctl disable --now edge-inspect.service 2>/dev/null; then
      echo "Stopped and disabled edge-inspect.service."
    fi
  elif [ -e "$unit" ]; then
    systemctl --root="$root" disable edge-inspect.service >/dev/null 2>&1 || true
  fi
  if [ -e "$unit" ]; then rm -f "$unit"; echo "Removed the unit $unit."; fi
  rm -f "$dropins/gpu.conf"
  if [ -d "$dropins" ]; then
    if [ "$purge" = 1 ]; then rm -rf "$dropins"
    else rmdir "$dropins" 2>/dev/null || kept+=("$dropins (your drop-ins)")
    fi
  fi
  if on_system; then systemctl daemon-reload || true; fi
  if [ -L "$link" ] && [ "$(readlink "$link")" = "$prefix/bin/edge-inspect" ]; then rm -f "$link"; fi
  if [ -d "$venv_dir" ]; then
    # The venv, but not the models that may sit beside it (PREFIX/models): those are data.
    if [ -f "$venv_dir/pyvenv.cfg" ] && [ -e "$venv_dir/bin/edge-inspect" ]; then
      find "$venv_dir" -mindepth 1 -maxdepth 1 ! -name models -exec rm -rf {} +
      echo "Removed the virtual environment $venv_dir."
    elif [ -n "$(find "$venv_dir" -mindepth 1 -maxdepth 1 ! -name models -print -quit)" ]; then
      echo "Warning: $venv_dir holds no edge-inspect virtual environment (no pyvenv.cfg, no bin/edge-inspect):" \
           "left as it is. Is PREFIX right?" >&2
    fi
    if [ -d "$venv_dir/models" ]; then
      if [ "$purge" = 1 ]; then rm -rf "$venv_dir/models"; echo "Purged $venv_dir/models (the models)."
      else kept+=("$venv_dir/models (the models)")
      fi
    fi
    rmdir "$venv_dir" 2>/dev/null || true
  fi
  rm -rf "$cache"
  owner=""
  if on_system && id -u "$user" >/dev/null 2>&1; then
    owner="$(id -u "$user")"
    userdel "$user"
    echo "Removed the user $user (uid $owner)."
  fi
  for data in "$etc:the configuration" "$srv:hot folders, ledgers, results, heatmaps"; do
    path="${data%%:*}"
    [ -e "$path" ] || continue
    if [ "$purge" = 1 ]; then rm -rf "$path"; echo "Purged $path (${data#*:})."
    else kept+=("$path (${data#*:})")
    fi
  done
  if [ "${#kept[@]}" -gt 0 ]; then
    echo "Kept:"
    printf '  %s\n' "${kept[@]}"
    echo "--uninstall --purge removes them."
    if [ -n "$owner" ] && [ -e "$srv" ]; then
      echo "Files in $srv still belong to uid $owner; a new install's user may get another uid:" \
           "then run sudo chown -R $user: $srv"
    fi
  fi
  exit 0
fi

if [ "$service" = 1 ]; then
  need_systemctl --service "Install without --service."
fi

if [ "$venv" = 1 ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "Error: edge-inspect needs Python 3.11 or newer; '$python' is $("$python" -V 2>&1). Set PYTHON=..." >&2; exit 1; }
  "$python" -m venv "$venv_dir"
  "$venv_dir/bin/pip" install --quiet --upgrade pip
  "$venv_dir/bin/pip" install --quiet "$here${extras:+[$extras]}"
  if [ "$gpu" = 1 ]; then
    # onnxruntime-gpu replaces the CPU wheel: both provide the module
    # 'onnxruntime', and with both installed the last one wins at random.
    "$venv_dir/bin/pip" uninstall --quiet -y onnxruntime
    "$venv_dir/bin/pip" install --quiet "onnxruntime-gpu[cuda,cudnn]>=1.18"
  fi
  install -d "$(dirname "$link")"
  ln -sf "$prefix/bin/edge-inspect" "$link"
  echo "Installed: $("$venv_dir/bin/edge-inspect" --help >/dev/null && echo "$venv_dir/bin/edge-inspect (linked from $link)")"
elif [ ! -x "$venv_dir/bin/edge-inspect" ]; then
  echo "Error: --no-venv uses the edge-inspect in $venv_dir, and there is none." \
       "Install it first (without --no-venv)." >&2
  exit 1
fi

if [ "$service" = 1 ]; then
  owner=()
  if on_system; then
    # A system user without a login; add the users (or the Samba account) that
    # drop parts into the hot folder to its group.
    id -u "$user" >/dev/null 2>&1 || useradd --system --user-group --home-dir /var/lib/edge-inspect \
      --no-create-home --shell /usr/sbin/nologin --comment "edge-inspect service" "$user"
    owner=(-o "$user" -g "$user")
  fi
  # setgid: files dropped in the hot folder belong to the group, so that the service can read them.
  install -d "${owner[@]}" -m 2775 "$srv" "$srv/incoming"
  install -d -m 0755 "$etc"
  # The configuration may hold passwords (brokers): readable by root and the service's group only.
  group=()
  if on_system; then group=(-g "$user"); fi
  if [ ! -e "$config" ]; then
    install -m 0640 "${group[@]}" "$here/deploy/config.example.toml" "$config"
    echo "Installed the configuration $config from deploy/config.example.toml."
  elif cmp -s "$here/deploy/config.example.toml" "$config"; then
    echo "Kept the configuration $config (the example, unchanged)."
  else
    install -m 0640 "${group[@]}" "$here/deploy/config.example.toml" "$config.new"
    echo "Kept your configuration $config; this version's example is beside it, as $config.new" \
         "(see what changed: diff -u $config $config.new)."
  fi
  # A kept configuration must stay readable by the service (a reinstalled user may have a new group id).
  if on_system; then chgrp "$user" "$config"; fi
  if [ -e "$etc/edge-inspect.env" ]; then
    echo "Note: $etc/edge-inspect.env is no longer read. Carry its settings into $config" \
         "(WATCH_DIR: sources.NAME.path, MODEL_DIR: model, WATCH_OPTIONS: sinks and the other keys), then delete it:"
    grep -v '^[[:space:]]*\(#\|$\)' "$etc/edge-inspect.env" | sed 's/^/  /' || true
  fi
  install -d -m 0755 "$unit_dir"
  render_unit > "$unit.new"
  chmod 0644 "$unit.new"
  mv "$unit.new" "$unit"
  if [ "$gpu" = 1 ]; then
    # CUDA needs /dev/nvidia*, which the unit's PrivateDevices=yes hides and DevicePolicy=closed denies.
    install -d -m 0755 "$dropins"
    printf '%s\n' '[Service]' \
      '# CUDA needs /dev/nvidia* (written by install.sh --gpu --service). The device list is read' \
      '# when the unit starts: load the driver modules (nvidia, nvidia-uvm) at boot.' \
      'PrivateDevices=no' 'DeviceAllow=char-nvidia* rw' > "$dropins/gpu.conf"
  fi
  if on_system; then systemctl daemon-reload; fi

  # Check the configuration as the service will read it: as its user, from its working folder.
  if on_system; then
    check=(runuser -u "$user" -- "$prefix/bin/edge-inspect" config check "$config")
  else
    check=("$venv_dir/bin/edge-inspect" config check "$config")
  fi
  if ! report="$(cd "$srv" && "${check[@]}" 2>&1)"; then
    {
      echo "Error: the configuration does not pass the check, so this run neither enables nor (re)starts edge-inspect:"
      echo "$report" | sed 's/^/  /'
      echo "Everything else is installed. Edit $config (sudoedit $config), then run this script again, or:"
      echo "  sudo -u $user edge-inspect config check $config && sudo systemctl enable --now edge-inspect"
    } >&2
    exit 1
  fi
  echo "$report"
  if on_system; then
    systemctl enable --quiet edge-inspect.service
    systemctl restart edge-inspect.service
    echo "Service enabled and (re)started. Follow it with: journalctl -u edge-inspect -f"
    echo "After editing $config: sudo systemctl reload edge-inspect"
  else
    systemctl --root="$root" enable --quiet edge-inspect.service
    echo "Service enabled in $root: it starts when that system boots. No user was created there: add $user."
  fi
fi
