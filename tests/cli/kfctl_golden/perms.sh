# Permissions: setperm, chown, chgrp and what list/show/describe print.
# Keys are named by serial: once a key is not searchable, a %type:desc
# lookup would scan the whole machine's /proc/keys with Debian's keyctl.
k=$(keyctl add user k value @s); echo k=$k
keyctl setperm $k 0x3f3f3f3f
keyctl describe $k
keyctl list @s
keyctl setperm $k 0x3f000000
keyctl describe $k
keyctl list @s
keyctl setperm $k 0x0b000000
keyctl describe $k
echo rc=$?
keyctl rdescribe $k
echo rc=$?
keyctl list @s
keyctl show
keyctl read $k
echo rc=$?
keyctl setperm $k 0x3f010000
echo rc=$?
keyctl chown $k 0
echo rc=$?
keyctl chgrp $k 0
echo rc=$?
keyctl chgrp $k -1
echo rc=$?
keyctl setperm $k 0x01000000
keyctl setperm $k 0x3f010000
echo rc=$?
keyctl new_session
r=$(keyctl newring r @s); echo r=$r
keyctl add user inner v $r
keyctl setperm $r 0x3d3f0000
keyctl show
keyctl setperm $r 0x3c3c0000
keyctl show
keyctl list @s
keyctl setperm $r 0x3f010000
keyctl add logon svc:name secret @s
keyctl describe %logon:svc:name
keyctl read %logon:svc:name
echo rc=$?
keyctl print %logon:svc:name
echo rc=$?
keyctl pipe %logon:svc:name
echo rc=$?
keyctl update %logon:svc:name newsecret
echo rc=$?
keyctl setperm 0x7fffffff 0x3f010000
echo rc=$?
