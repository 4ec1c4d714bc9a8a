# %type:desc when request_key() finds nothing: libkeyutils reads
# /proc/keys, every key the caller may view wherever it is linked, lowest
# serial first, and takes the first it can describe.  The descriptions are
# this script's own: /proc/keys shows the whole machine's keys.
k=$(keyctl add user kfgolden:d1 v1 @s); echo rc=$?
r=$(keyctl newring kfgolden:r1 @s); echo rc=$?
k2=$(keyctl add user kfgolden:d2 v2 "$r"); echo rc=$?
k3=$(keyctl add user kfgolden:d3 v3 @s); echo rc=$?
k4=$(keyctl add user kfgolden:d4 v4 @s); echo rc=$?
keyctl setperm "$k3" 0x3f000000; echo rc=$?
keyctl describe %user:kfgolden:d1; echo rc=$?
keyctl describe %:kfgolden:r1; echo rc=$?
keyctl describe %user:kfgolden:d3; echo rc=$?
keyctl revoke "$k4"; echo rc=$?
# @s is no longer searchable: request_key() finds none of them
keyctl setperm @s 0x01010101; echo rc=$?
keyctl describe %user:kfgolden:d1; echo rc=$?
keyctl describe %keyring:kfgolden:r1; echo rc=$?
keyctl describe %:kfgolden:r1; echo rc=$?
keyctl describe %user:kfgolden:d2; echo rc=$?
# only its possessor may view it, and it is no longer possessed
keyctl describe %user:kfgolden:d3; echo rc=$?
# revoked: listed, but its describe fails, so it is passed over
keyctl describe %user:kfgolden:d4; echo rc=$?
keyctl describe %user:kfgolden:none; echo rc=$?
keyctl describe %logon:kfgolden:d1; echo rc=$?
