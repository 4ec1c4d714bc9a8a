# Adding, reading and describing keys: the everyday commands.
# Run by tests/cli/test_kfctl.py as `<tool> session - sh basic.sh`, where
# `keyctl` is Debian's keyctl or kfctl; serials are normalized.  A listed
# keyring holds at most two keys: past that the kernel's listing order
# (its assoc-array slots) and keyfence's (link order) differ.
keyctl add user greeting hello @s
echo rc=$?
keyctl describe %user:greeting
keyctl rdescribe %user:greeting
keyctl rdescribe %user:greeting :
keyctl read %user:greeting
keyctl print %user:greeting
keyctl pipe %user:greeting
echo
keyctl update %user:greeting "hello again"
keyctl print %user:greeting
keyctl update -x %user:greeting "a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af b0 b1 b2 b3 b4 b5 b6 b7 b8 b9 ba bb bc bd be bf c0 c1 c2 c3"
keyctl read %user:greeting
keyctl print %user:greeting
printf 'from stdin' | keyctl pupdate %user:greeting
keyctl print %user:greeting
printf '41 42\n43' | keyctl pupdate -x %user:greeting
keyctl print %user:greeting
keyctl newring stdin @s
printf 'piped payload' | keyctl padd user piped %:stdin
printf '6b 66\t63 74 6c' | keyctl padd -x user hexed %:stdin
keyctl print %user:hexed
keyctl add -x user empty "" @s
echo rc=$?
keyctl show
keyctl show -x
keyctl list @s
keyctl list %:stdin
keyctl id %user:piped
keyctl id @s
keyctl id -3
keyctl id 0xfffffffd
keyctl id 4294967293
keyctl describe @s
keyctl rlist %:_ses
keyctl rlist %:stdin
keyctl new_session
keyctl newring shelf @s
keyctl add user book pages %:shelf
keyctl search @s user book
keyctl search %:shelf user book
keyctl search @s keyring shelf
keyctl request user book
keyctl request user book @s
echo rc=$?
keyctl list @s
keyctl rlist @s
keyctl show %:shelf
keyctl show -x %:shelf
keyctl security %user:book
keyctl describe @u
keyctl rdescribe @us
keyctl show @us
keyctl --version >/dev/null
echo rc=$?
