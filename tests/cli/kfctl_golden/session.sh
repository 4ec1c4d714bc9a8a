# Session keyrings: session, new_session, and named keyrings.
keyctl rdescribe @s
keyctl session - sh -c 'keyctl rdescribe @s; keyctl show'
echo rc=$?
keyctl session fish sh -c 'keyctl rdescribe @s; exit 7'
echo rc=$?
keyctl session fish keyctl rdescribe @s
echo rc=$?
keyctl rdescribe @s
keyctl new_session
keyctl rdescribe @s
keyctl add user inner v @s
keyctl new_session named
keyctl rdescribe @s
keyctl show
keyctl new_session ""
echo rc=$?
keyctl new_session .dot
echo rc=$?
SHELL=/bin/true keyctl session -
echo rc=$?
