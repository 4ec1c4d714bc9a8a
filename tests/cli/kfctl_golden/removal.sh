# Revoke, clear, invalidate, unlink, timeouts, reap and purge.  Dead keys
# are named by serial: a %type:desc lookup of one would scan the whole
# machine's /proc/keys with Debian's keyctl.
keyctl newring ring @s
a=$(keyctl add user a alpha %:ring); echo a=$a
keyctl add user b beta %:ring
keyctl revoke $a
echo rc=$?
keyctl describe $a
echo rc=$?
keyctl list %:ring
keyctl show
keyctl read $a
echo rc=$?
keyctl revoke $a
echo rc=$?
keyctl reap -v
keyctl list %:ring
keyctl clear %:ring
echo rc=$?
keyctl list %:ring
keyctl rlist %:ring
c=$(keyctl add user c gamma @s); echo c=$c
keyctl invalidate $c
echo rc=$?
keyctl describe $c
echo rc=$?
keyctl add user d delta @s
keyctl link %user:d %:ring
keyctl unlink %user:d
keyctl new_session
e=$(keyctl add user e epsilon @s); echo e=$e
keyctl timeout $e 1
echo rc=$?
sleep 2
keyctl read $e
echo rc=$?
keyctl list @s
keyctl reap
keyctl add user f zeta @s
keyctl timeout %user:f 100
keyctl timeout %user:f 0
echo rc=$?
keyctl print %user:f
keyctl clear %user:f
echo rc=$?
keyctl unlink %user:f
keyctl purge user
keyctl newring ring @s
keyctl add user Mixed one @s
keyctl add user mixedcase two %:ring
keyctl purge user mixed
keyctl purge -i user mixed
keyctl add user prefix:one 1 @s
keyctl add user prefix:two 2 %:ring
keyctl purge -p user prefix:t
keyctl purge -p user prefix:
keyctl add user needle 1 %:ring
keyctl purge -s user needle
keyctl purge -s user needle
keyctl show
keyctl clear @s
keyctl show
