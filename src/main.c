#include "wp_setup.h"
int main(void) { return 0; }
