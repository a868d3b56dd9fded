// Giving back, once the VM runs, the memory that only set-up needed: the
// analogue of Linux freeing its __init sections after boot.
//
// Threading: call once, from the main thread, after every thread is started;
// other threads may run meanwhile (they simply fault their code back in).
#pragma once

namespace kguest {

// Unmaps the pages of kguest's own read-only segments (code, read-only data,
// unwind tables) from this process and trims the heap. Code that runs again
// (the vCPU exit paths, the device loops, the API) is faulted back in from
// the page cache on its next use; code that ran only during set-up (argument
// parsing, the loaders, the ACPI builder, the Machine's construction) stays
// out of kguest's resident set. Nothing is lost: these pages are never
// written, so the file holds exactly what was mapped. Failures are logged,
// never fatal (the VM runs the same, only larger).
void drop_setup_pages();

} // namespace kguest
