#!/bin/sh
# /init of the test guest (tests/guest.py builds it into the initramfs). Does what the kernel command
# line's mfs_task= says, reports with "MFS ..." lines on the console (ttyS0), and powers off.
#   mfs_task=disk   the disk is /dev/vda (QEMU's virtio drive on mirrorfs): make ext4, then write
#                   files until the host sends a line on ttyS1; every file's checksum is printed
#   mfs_task=group  two disks, /dev/vda and /dev/vdb (a group of mirrorfs disks): files on vda, and
#                   after each, a record on vdb naming it and its checksum
#   mfs_task=nbd    attach mirrorfs with nbd-client over the network (a QEMU guestfwd to mirrorfs's
#                   socket on the host), make ext4 on /dev/nbd0, write files, detach
# Both end with the checksums read back from the disk (page cache dropped), and the file system
# unmounted, so that the host can check the image.

/bin/busybox --install -s
export PATH=/usr/local/sbin:/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "MFS $*"; }
fail() { say "FAIL $*"; sync; poweroff -f; }
sum() { sha256sum "$1" | cut -d' ' -f1; }

for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m" || fail "insmod $m"
done
task=$(sed -n 's/.*mfs_task=\([a-z]*\).*/\1/p' /proc/cmdline)
say BOOTED "$task" "$(cut -d' ' -f1 /proc/uptime)"

# Files f0..f23 written over and over, of 4 KiB to 188 KiB, each fsynced: a steady stream of writes,
# overwrites and metadata updates on the disk.
write_file() {
    name=f$(($1 % 24))
    dd if=/dev/urandom of="/mnt/$name" bs=4096 count=$((1 + ($1 * 7) % 47)) conv=fsync 2>/dev/null \
        || fail "write $name"
    say FILE "$name" "$(sum "/mnt/$name")"
}

finish() {
    sync
    echo 3 > /proc/sys/vm/drop_caches
    for f in /mnt/f*; do
        say FINAL "${f#/mnt/}" "$(sum "$f")"
    done
    umount /mnt || fail "umount"
}

case "$task" in
disk)
    stty -F /dev/ttyS1 -echo
    mkfs.ext4 -q -F /dev/vda || fail "mkfs.ext4 /dev/vda"
    mount -t ext4 /dev/vda /mnt || fail "mount /dev/vda"
    (read -r line < /dev/ttyS1; : > /tmp/stop) &
    say READY
    i=0
    while [ ! -e /tmp/stop ]; do
        write_file $i
        i=$((i + 1))
    done
    finish
    ;;
group)
    # Two disks of one group (tests/test_libvirt.py): file f<k> on /dev/vda, fsynced, then the
    # record r<k> on /dev/vdb naming it and its hash, fsynced: a record names a write the other
    # disk acknowledged first.
    stty -F /dev/ttyS1 -echo
    mkfs.ext4 -q -F /dev/vda || fail "mkfs.ext4 /dev/vda"
    mkfs.ext4 -q -F /dev/vdb || fail "mkfs.ext4 /dev/vdb"
    mount -t ext4 /dev/vda /mnt || fail "mount /dev/vda"
    mkdir -p /rec
    mount -t ext4 /dev/vdb /rec || fail "mount /dev/vdb"
    (read -r line < /dev/ttyS1; : > /tmp/stop) &
    say READY
    i=0
    while [ ! -e /tmp/stop ]; do
        write_file $i
        k=$((i % 24))
        echo "f$k $(sum "/mnt/f$k")" | dd of="/rec/r$k" conv=fsync 2>/dev/null || fail "record r$k"
        i=$((i + 1))
    done
    finish
    echo 3 > /proc/sys/vm/drop_caches
    for r in /rec/r*; do
        say RECORD "${r#/rec/}" $(cat "$r")
        say FINALREC "${r#/rec/}" "$(sum "$r")"
    done
    umount /rec || fail "umount /rec"
    ;;
nbd)
    ip link set lo up
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    # mirrorfs's commands as in docs/USING.md's "Using it with nbd-client"
    nbd-client 10.0.2.100 10809 /dev/nbd0 -N '' || fail "nbd-client"
    say ATTACHED "$(cat /sys/block/nbd0/size)"
    mkfs.ext4 -q /dev/nbd0 || fail "mkfs.ext4 /dev/nbd0"
    mount -t ext4 /dev/nbd0 /mnt || fail "mount /dev/nbd0"
    i=0
    while [ $i -lt 40 ]; do
        write_file $i
        i=$((i + 1))
    done
    finish
    nbd-client -d /dev/nbd0 || fail "nbd-client -d"
    ;;
*)
    fail "unknown task '$task'"
    ;;
esac
say DONE
poweroff -f
