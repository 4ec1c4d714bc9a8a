# @u without permissions: both user keyrings are ENOKEY; cleared, nothing changes.
keyctl setperm @u 0; keyctl id @us; keyctl id @u; keyctl describe @u; keyctl add user a b @u; keyctl rlist @us
keyctl clear @s; keyctl id @s > /dev/null && echo ok
