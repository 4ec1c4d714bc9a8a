# @u and @us after the user session keyring was revoked: look_up_user_keyrings()
# fails and every lookup of either is ENOKEY.
keyctl revoke @us; keyctl id @us; keyctl id @u; keyctl describe @us; keyctl rlist @u; keyctl add user a b @us; keyctl add user a b @u; keyctl show @u
keyctl request2 user x info; keyctl request2 user x info
echo done
