//! Running as the data folder's owner.
//!
//! Under the packaged unit the data folder belongs to the service account
//! (`User=shardstore`), and an operator runs `serve --format`,
//! `serve --rebuild-index` or `check --rebuild` on it by hand, as root.
//! What such a run creates (the node file, shard folders, sled's index
//! files) must be the service's, or the service cannot write it at its next
//! start; and nothing under the folder is opened with root's rights (the
//! service account owns the folder and could swap a path in it for a
//! symlink to anywhere). So, run as root on a folder that belongs to
//! another user, `serve` and `check` become that user before they open
//! anything in it.
//!
//! Order: the steps that need root come first (the caller's), then the
//! switch, before the process starts any thread: a credential change must
//! hold for every thread (glibc's `setresuid` does broadcast it to all of
//! them, but nothing should run as root in between).

use anyhow::Context;
use std::path::Path;

/// Run as root on a data folder that belongs to another user, becomes that
/// user as systemd's `User=` does: the user's own group (from the user
/// database), its supplementary groups (so access through a group such as
/// the device node's still works), then its uid. A uid the user database
/// does not know takes the folder's group, which must not be root's.
/// Returns the ids taken; `None` when not root, when root owns the folder,
/// or when the folder does not exist yet (then it is created by whoever
/// runs, as before).
pub fn become_folder_owner(data_dir: &Path) -> anyhow::Result<Option<(u32, u32)>> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let m = match std::fs::metadata(data_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", data_dir.display())),
    };
    let uid = m.uid();
    if uid == 0 {
        return Ok(None);
    }
    let user = user_entry(uid);
    let gid = user.as_ref().map_or(m.gid(), |u| u.1);
    if gid == 0 {
        anyhow::bail!(
            "{} belongs to uid {uid}, which has no entry in the user database, and to group root: \
             give it the service's group (chown {uid}:GROUP) or run this as that user",
            data_dir.display()
        );
    }
    let name = user.map(|u| u.0);
    // SAFETY: plain credential calls, made before this process starts any
    // other thread (glibc applies them to every thread anyway); `name` is a
    // NUL-terminated string that outlives the call.
    let failed = unsafe {
        let groups = match &name {
            Some(n) => libc::initgroups(n.as_ptr(), gid),
            None => libc::setgroups(0, std::ptr::null()),
        };
        groups != 0 || libc::setresgid(gid, gid, gid) != 0 || libc::setresuid(uid, uid, uid) != 0
    };
    if failed {
        anyhow::bail!(
            "could not become {uid}:{gid}, the owner of {}: {}",
            data_dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(Some((uid, gid)))
}

/// The login name of `uid` (for its supplementary groups) and its own
/// group; `None` when the user database has no entry for it (a bare uid:
/// no supplementary groups).
fn user_entry(uid: u32) -> Option<(std::ffi::CString, u32)> {
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: getpwuid_r fills `pw` with pointers into `buf`, both alive
    // here; the name is copied out before they go.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found);
        if rc != 0 || found.is_null() || pw.pw_name.is_null() {
            return None;
        }
        Some((std::ffi::CStr::from_ptr(pw.pw_name).to_owned(), pw.pw_gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No switch (and no error) for a folder that does not exist yet, nor
    /// for one of root's: the process keeps its user. (The switch itself is
    /// tested on the binary, in `tests/serve_owner.rs` and `tests/check.rs`:
    /// it cannot be undone in a test process.)
    #[test]
    fn a_new_folder_or_roots_own_keeps_the_user() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("not-yet");
        assert_eq!(become_folder_owner(&missing).unwrap(), None);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(become_folder_owner(t.path()).unwrap(), None);
        }
    }
}
