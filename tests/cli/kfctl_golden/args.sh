# Every command with too few and too many arguments: keyctl's usage
# text (exit 2) or its own message; only the first line is kept.
run() { keyctl "$@" >out 2>&1; r=$?; echo "$* rc=$r $(head -1 out)"; }
run add
run add @s 1 @s
run add @s 1 @s 1 @s
run add @s 1 @s 1 @s 1 @s 1
run add -x
run chgrp
run chgrp @s
run chgrp @s 1 @s
run chgrp @s 1 @s 1 @s 1
run chown
run chown @s
run chown @s 1 @s
run chown @s 1 @s 1 @s 1
run clear
run clear @s 1
run clear @s 1 @s 1 @s
run describe
run describe @s 1
run describe @s 1 @s 1 @s
run dh_compute
run dh_compute @s 1
run dh_compute @s 1 @s 1
run dh_compute @s 1 @s 1 @s 1 @s
run dh_compute_kdf
run dh_compute_kdf @s 1 @s 1
run dh_compute_kdf @s 1 @s 1 @s 1
run dh_compute_kdf @s 1 @s 1 @s 1 @s 1 @s
run dh_compute_kdf_oi
run dh_compute_kdf_oi @s 1 @s 1
run dh_compute_kdf_oi @s 1 @s 1 @s 1
run dh_compute_kdf_oi @s 1 @s 1 @s 1 @s 1 @s
run dh_compute_kdf_oi -x
run get_persistent
run get_persistent @s 1 @s
run get_persistent @s 1 @s 1 @s 1
run id
run id @s 1
run id @s 1 @s 1 @s
run instantiate
run instantiate @s 1
run instantiate @s 1 @s 1
run instantiate @s 1 @s 1 @s 1 @s
run instantiate -x
run invalidate
run invalidate @s 1
run invalidate @s 1 @s 1 @s
run link
run link @s
run link @s 1 @s
run link @s 1 @s 1 @s 1
run list
run list @s 1
run list @s 1 @s 1 @s
run move
run move @s 1
run move @s 1 @s 1
run move @s 1 @s 1 @s
run negate
run negate @s 1
run negate @s 1 @s 1
run negate @s 1 @s 1 @s 1 @s
run new_session @s 1
run new_session @s 1 @s 1 @s
run newring
run newring @s
run newring @s 1 @s
run newring @s 1 @s 1 @s 1
run padd
run padd @s 1
run padd @s 1 @s 1
run padd @s 1 @s 1 @s 1 @s
run padd -x
run pinstantiate
run pinstantiate @s
run pinstantiate @s 1 @s
run pinstantiate @s 1 @s 1 @s 1
run pinstantiate -x
run pipe
run pipe @s 1
run pipe @s 1 @s 1 @s
run pkey_query
run pkey_query @s
run pkey_encrypt
run pkey_encrypt @s
run pkey_encrypt @s 1
run pkey_decrypt
run pkey_decrypt @s
run pkey_decrypt @s 1
run pkey_sign
run pkey_sign @s
run pkey_sign @s 1
run pkey_verify
run pkey_verify @s
run pkey_verify @s 1
run pkey_verify @s 1 @s
run prequest2
run prequest2 @s
run prequest2 @s 1 @s 1
run prequest2 @s 1 @s 1 @s 1 @s
run print
run print @s 1
run print @s 1 @s 1 @s
run pupdate
run pupdate @s 1
run pupdate @s 1 @s 1 @s
run pupdate -x
run purge
run purge @s 1 @s
run purge @s 1 @s 1
run rdescribe
run rdescribe @s 1 @s
run rdescribe @s 1 @s 1 @s 1
run read
run read @s 1
run read @s 1 @s 1 @s
run reap @s
run reap @s 1 @s 1
run reap -v
run reject
run reject @s 1 @s
run reject @s 1 @s 1 @s
run reject @s 1 @s 1 @s 1 @s 1
run request
run request @s
run request @s 1 @s 1
run request @s 1 @s 1 @s 1 @s
run request2
run request2 @s 1
run request2 @s 1 @s 1 @s
run request2 @s 1 @s 1 @s 1 @s 1
run restrict_keyring
run restrict_keyring @s 1 @s 1
run restrict_keyring @s 1 @s 1 @s 1 @s
run revoke
run revoke @s 1
run revoke @s 1 @s 1 @s
run rlist
run rlist @s 1
run rlist @s 1 @s 1 @s
run search
run search @s 1
run search @s 1 @s 1 @s
run search @s 1 @s 1 @s 1 @s 1
run security
run security @s 1
run security @s 1 @s 1 @s
run setperm
run setperm @s
run setperm @s 1 @s
run setperm @s 1 @s 1 @s 1
run show @s 1
run show @s 1 @s 1 @s
run show -x
run supports @s 1
run supports @s 1 @s 1 @s
run timeout
run timeout @s
run timeout @s 1 @s
run timeout @s 1 @s 1 @s 1
run unlink
run unlink @s 1 @s
run unlink @s 1 @s 1 @s 1
run update
run update @s
run update @s 1 @s
run update @s 1 @s 1 @s 1
run update -x
run watch
run watch @s 1
run watch @s 1 @s
run watch_add
run watch_add @s
run watch_add @s 1 @s
run watch_add @s 1 @s 1 @s 1
run watch_rm
run watch_rm @s
run watch_rm @s 1 @s
run watch_rm @s 1 @s 1 @s 1
run watch_session
run watch_session @s
run watch_session @s 1 @s
run watch_sync
run watch_sync @s 1
run watch_sync @s 1 @s 1 @s
run move -f @s @s
run reap -v -v
run show -x -x @s
run purge -p -i
run purge -s user
run purge -x user
run watch -f
run supports a b
run rdescribe @s ''
rm -f out
# rdescribe's separator is the argument's first byte, even of a
# multi-byte character
keyctl rdescribe @s é | od -An -c | head -1
# SHELL set but empty: keyctl's execl("") fails as perror("") says
echo exit | SHELL= keyctl session
echo "session with SHELL= rc=$?"
# more than 1 MiB on stdin: keyctl 1.6.3 cuts it at 1 MiB (its "Too much
# data read on stdin" cannot fire) and the kernel refuses the payload
head -c 1048577 /dev/zero | keyctl padd user big @s
echo "padd 1 MiB + 1 rc=$?"
keyctl add user small v @s >/dev/null
head -c 2000000 /dev/zero | keyctl pupdate %user:small
echo "pupdate 2 MB rc=$?"
