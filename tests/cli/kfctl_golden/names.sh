# Descriptions and names that are not UTF-8: the kernel takes any bytes but
# NUL (keyfence.keys.text).  Output goes through `cat -v` (M-i is \351).
cafe=$(printf 'caf\351')
ring=$(printf 'ring\377')
keyctl add user "$cafe" data @s >/dev/null
echo rc=$?
keyctl describe %user:"$cafe" | cat -v
keyctl rdescribe %user:"$cafe" | cat -v
keyctl rdescribe %user:"$cafe" "$(printf '\351')" | cat -v
keyctl search @s user "$cafe" >/dev/null
echo rc=$?
keyctl print %user:"$cafe"
keyctl update %user:"$cafe" again
keyctl print %user:"$cafe"
keyctl newring "$ring" @s >/dev/null
echo rc=$?
keyctl rdescribe %keyring:"$ring" | cat -v
keyctl add user "$(printf '\377\376')" x %keyring:"$ring" >/dev/null
keyctl show %keyring:"$ring" | cat -v
keyctl request user "$cafe" >/dev/null
echo rc=$?
keyctl add "$(printf 'us\351r')" x y @s
echo rc=$?
keyctl search @s user "$(printf 'caf\350')"
echo rc=$?
keyctl purge user "$cafe" | cat -v
keyctl purge -s user "$(printf '\377\376')" | cat -v
keyctl session "$(printf 's\351ss')" sh -c 'keyctl rdescribe @s' | cat -v
