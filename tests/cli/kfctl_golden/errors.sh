# Usage errors, bad key ids and failing operations: texts and exit codes.
keyctl
echo rc=$?
keyctl nosuchcommand
echo rc=$?
keyctl sho
echo rc=$?
keyctl add user onlytwo
echo rc=$?
keyctl show @s extra
echo rc=$?
keyctl id
echo rc=$?
keyctl id @x
echo rc=$?
keyctl id 12x
echo rc=$?
keyctl id %
echo rc=$?
keyctl id %user
echo rc=$?
keyctl id %user:
echo rc=$?
keyctl id %:
echo rc=$?
keyctl id %user:nosuchkey
echo rc=$?
keyctl id ""
echo rc=$?
keyctl id 0x10
echo rc=$?
keyctl id 08
echo rc=$?
keyctl id @p
echo rc=$?
keyctl id @g
echo rc=$?
keyctl show @t
echo rc=$?
keyctl show -x -x
echo rc=$?
keyctl add user "" value @s
echo rc=$?
keyctl add nosuchtype desc value @s
echo rc=$?
keyctl add user desc "" @s
echo rc=$?
keyctl add keyring .dot "" @s
echo rc=$?
keyctl add logon nocolon value @s
echo rc=$?
keyctl add -x user desc "abc" @s
echo rc=$?
keyctl add -x user desc "zz" @s
echo rc=$?
keyctl add -x user desc "zz" @bad
echo rc=$?
keyctl add user desc value @bad
echo rc=$?
keyctl add user k v @s
keyctl add user desc value %user:k
echo rc=$?
keyctl update @s data
echo rc=$?
keyctl read 12345
echo rc=$?
keyctl describe 12345
echo rc=$?
keyctl rdescribe @s ""
echo rc=$?
keyctl link @s @s
echo rc=$?
keyctl link %user:k %user:k
echo rc=$?
keyctl unlink %user:k %user:k
echo rc=$?
keyctl newring r @s
keyctl unlink %user:k %:r
echo rc=$?
keyctl search @s user nosuch
echo rc=$?
keyctl search %user:k user k
echo rc=$?
keyctl request user nosuch
echo rc=$?
keyctl request nosuchtype k
echo rc=$?
keyctl timeout %user:k abc
echo rc=$?
keyctl timeout %user:k 0x10
echo rc=$?
keyctl setperm %user:k zz
echo rc=$?
keyctl setperm %user:k 0xff000000
echo rc=$?
keyctl chown %user:k abc
echo rc=$?
keyctl chgrp %user:k 0x
echo rc=$?
keyctl move %user:k @s
echo rc=$?
keyctl move -f %user:k @s
echo rc=$?
keyctl move -x %user:k @s @u
echo rc=$?
keyctl purge
echo rc=$?
keyctl purge -x user
echo rc=$?
keyctl purge -p user
echo rc=$?
keyctl purge -s user
echo rc=$?
keyctl purge user a b
echo rc=$?
keyctl reap -x
echo rc=$?
keyctl new_session a b
echo rc=$?
keyctl supports a b
echo rc=$?
keyctl supports nosuchcap
echo rc=$?
keyctl watch -z @s
echo rc=$?
keyctl watch -f
echo rc=$?
keyctl watch @s -fq
echo rc=$?
keyctl watch @s @s
echo rc=$?
keyctl session ""
echo rc=$?
keyctl session - no-such-program-here
echo rc=$?
keyctl instantiate %user:k data @s
echo rc=$?
keyctl negate %user:k 10 @s
echo rc=$?
keyctl reject %user:k 10 rejected @s
echo rc=$?
keyctl dh_compute %user:k %user:k %user:k
echo rc=$?
keyctl pkey_query %user:k 0
echo rc=$?
# (watch_add: this kernel has no watch queues, keyfence has: test_kfctl_watch.py)
keyctl show
