# show's whole tree (kfctl asks for it in one request, keys/keyring_tree.py):
# a key linked twice, a keyring linked into two others, a key that cannot
# be viewed, a keyring that cannot be read mid-tree (show stops there with
# exit 1), -x.  (One key per keyring where order matters: the kernel's
# keyrings list by hash, keyfence's by link order.)
a=$(keyctl newring a @s)
b=$(keyctl newring b @s)
k=$(keyctl add user k v $a)
keyctl link $k $b
keyctl link $b $a
keyctl show
echo rc=$?
keyctl add user hidden h $b >/dev/null
keyctl setperm %user:hidden 0x00000000
keyctl show -x $b
echo rc=$?
keyctl show $a
echo rc=$?
keyctl setperm $b 0x3d3f0000
keyctl show
echo rc=$?
keyctl setperm $b 0x3d000000
keyctl show $a
echo rc=$?
